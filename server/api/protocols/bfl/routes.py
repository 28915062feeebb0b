"""BFL's API for FLUX.1 [dev]: `POST /v1/flux-dev` and `GET /v1/get_result?id=`.

Errors keep BFL's shapes whatever handlers the app installs elsewhere: the routes use
`BflRoute`, which answers validation errors with `422 {"detail": [{loc, msg, type}]}` and HTTP
errors with `{"detail": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api import tenancy
from server.api.auth import KeyProblem, api_key_dependency
from server.api.deps import get_queue, get_settings, public_base_url
from server.api.errors import log_unhandled, register_error_renderer
from server.api.inputs import REDUX_FIT, InputImageError, decode, fetch_bytes
from server.api.protocols.bfl import adapter
from server.api.protocols.bfl.models import AsyncResponse, AsyncWebhookResponse, FluxDevInputs, ResultResponse
from server.api.webhooks.policy import validate_webhook_url
from server.config import Settings
from server.fetch import FetchPolicy

logger = logging.getLogger(__name__)
PATH_PREFIXES = ("/v1/flux-dev", "/v1/get_result")


def _error(loc: list[str | int], msg: str, error_type: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": error_type}


def validation_response(exc: RequestValidationError) -> JSONResponse:
    # Only loc/msg/type: pydantic's `input` would echo a whole base64 image back.
    detail = [
        _error(list(e.get("loc", ())), str(e.get("msg", "")), str(e.get("type", ""))) for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


class BflRoute(APIRoute):
    """Renders this router's errors in BFL's shapes, independent of app-level handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bfl_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_response(exc)
            except HTTPException as exc:
                return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

        return bfl_handler


async def render_error(request: Request, exc: Exception) -> Response:
    """App-level renderer for errors outside the routes (404/405, unexpected exceptions)."""
    if isinstance(exc, RequestValidationError):
        return validation_response(exc)
    if isinstance(exc, StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    log_unhandled(logger, request, exc)
    return JSONResponse({"detail": "Internal server error"}, status_code=500)


def setup(app: FastAPI) -> None:
    for prefix in PATH_PREFIXES:
        register_error_renderer(app, prefix, render_error)


def refuse_key(problem: KeyProblem) -> HTTPException:
    if problem is KeyProblem.MISSING:
        detail = "Not authenticated: send your API key in the x-key header"
        return HTTPException(status_code=401, detail=detail)
    return HTTPException(status_code=403, detail="Invalid API key")


class BflError(BaseModel):
    """BFL's error body: a message, or (422) a list of `{loc, msg, type}`."""

    detail: str | list[dict[str, Any]]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": BflError, "description": "No API key (x-key)"},
    403: {"model": BflError, "description": "Invalid API key"},
    413: {"model": BflError, "description": "Request body over the server's limit"},
    422: {"model": BflError, "description": "Invalid input"},
}
router = APIRouter(
    route_class=BflRoute,
    dependencies=[Depends(api_key_dependency(refuse_key))],
    tags=["BFL"],
    responses=ERROR_RESPONSES,
)


async def _decode_image_prompt(value: str, settings: Settings) -> bytes:
    """`image_prompt` as PNG bytes: BFL sends bare base64; a data: URI or http(s) URL works too."""
    max_bytes = settings.max_input_image_bytes
    try:
        if value.strip().lower().startswith(("data:", "http://", "https://")):
            policy = FetchPolicy.from_settings(settings)
            timeout = settings.input_fetch_timeout
            data = await fetch_bytes(value, max_bytes=max_bytes, timeout=timeout, policy=policy)
        else:
            try:
                data = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InputImageError("image_load_error", f"image_prompt is not valid base64: {exc}") from exc
            if len(data) > max_bytes:
                raise InputImageError("file_too_large", f"image_prompt is larger than {max_bytes} bytes")
        # A Redux job: shrunk to the image encoder's input size.
        return (await decode(data, REDUX_FIT, threads=settings.input_decode_threads)).png
    except InputImageError as exc:
        raise RequestValidationError(
            [_error(["body", "image_prompt"], exc.message, exc.error_type)]
        ) from None


@router.post(
    "/v1/flux-dev",
    operation_id="bfl_flux_dev",
    response_model=AsyncResponse | AsyncWebhookResponse,
    summary="Generate an image with FLUX.1 [dev] (BFL API)",
)
async def flux_dev(inputs: FluxDevInputs, request: Request) -> JSONResponse:
    settings = get_settings(request)
    too_long = settings.prompt_too_long(inputs.prompt)
    if too_long:
        raise RequestValidationError([_error(["body", "prompt"], too_long, "string_too_long")])
    if inputs.webhook_url:
        try:
            validate_webhook_url(inputs.webhook_url, settings)
        except ValueError as exc:
            raise RequestValidationError([_error(["body", "webhook_url"], str(exc), "value_error")]) from None
    image_png = None
    if inputs.image_prompt:
        image_png = await _decode_image_prompt(inputs.image_prompt, settings)
    base_url = public_base_url(request)
    job = adapter.inputs_to_job(
        inputs, base_url=base_url, image_png=image_png, default_acceleration=settings.default_acceleration
    )
    record = (await tenancy.submit(request, job)).record  # a repeated Idempotency-Key: the first one's
    polling_url = adapter.polling_url(base_url, record.id)
    body: AsyncResponse | AsyncWebhookResponse
    if inputs.webhook_url:
        body = AsyncWebhookResponse(
            id=record.id, status="Pending", webhook_url=inputs.webhook_url, polling_url=polling_url
        )
    else:
        body = AsyncResponse(id=record.id, polling_url=polling_url)
    return JSONResponse(body.model_dump())


@router.get(
    "/v1/get_result", operation_id="bfl_get_result", response_model=ResultResponse, summary="Poll a BFL task"
)
async def get_result(
    request: Request, id: str = Query(..., description="Task id from the submit")
) -> JSONResponse:
    # Another tenant's task is as unknown as a made-up id (server/api/tenancy.py).
    record = tenancy.owned(request, await get_queue(request).get(id, with_logs=False))
    if record is not None and record.job.protocol != "bfl":
        record = None  # another protocol's request: BFL clients cannot tell it exists
    return JSONResponse(adapter.record_to_result(record, id).model_dump(mode="json"))
