"""The OpenAPI document of the real surface (`/openapi.json`), and `/docs` and `/redoc` served
with assets shipped in the package (server/api/static/), so that they work air-gapped.

FastAPI documents the fixed routes (BFL, OpenAI, health, files, metrics); fal's pattern
routes are described per app and endpoint by server/api/protocols/fal/openapi.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from server.api.protocols.fal.openapi import fal_openapi

STATIC_DIR = Path(__file__).parent / "static"
DESCRIPTION = (
    "FLUX.1 [dev] on this server, through fal's queue and sync APIs, BFL's API and OpenAI's "
    "images API. Authenticate with `Authorization: Key <key>` (fal), `x-key: <key>` (BFL) or "
    "`Authorization: Bearer <key>` (OpenAI); any of them works on every route."
)
SECURITY_SCHEMES = {
    "FalKey": {"type": "apiKey", "in": "header", "name": "Authorization", "description": "Key <key>"},
    "BflKey": {"type": "apiKey", "in": "header", "name": "x-key"},
    "Bearer": {"type": "http", "scheme": "bearer"},
}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=DESCRIPTION, routes=app.routes)
        paths, schemas = fal_openapi(app.state.settings)
        schema["paths"] = {**paths, **schema.get("paths", {})}
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(schemas)
        components["securitySchemes"] = SECURITY_SCHEMES
        app.openapi_schema = schema
    return app.openapi_schema


def install_docs(app: FastAPI) -> None:
    """`/openapi.json`, `/docs` (Swagger UI), `/redoc` and the `/static` assets."""
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
            # No badge from the public validator service.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            redoc_js_url="/static/redoc/redoc.standalone.js",
            redoc_favicon_url="/static/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )
