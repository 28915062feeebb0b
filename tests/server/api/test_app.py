"""The app as a whole: files, error shapes, background maintenance, api_main (health:
tests/server/api/routes/test_health.py)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.app import create_app
from server.api.errors import register_error_renderer
from server.api.main import EXIT_UNSAFE, run_api, unsafe_listen_reason
from server.api.maintenance import purge_expired
from server.config import Settings
from server.storage import LocalStorage
from tests.server.conftest import api_settings, png_bytes, run_api_server


def test_files_are_served_with_type_and_caching(api):
    storage = LocalStorage(api.settings.files_dir)
    png = storage.save(png_bytes(8, 8), "png")
    jpeg = storage.save(b"\xff\xd8\xff\xe0not-really-a-jpeg", "jpeg")
    response = api.client.get(f"/files/{png}")
    assert response.status_code == 200 and response.content == png_bytes(8, 8)
    assert response.headers["content-type"] == "image/png"
    assert (
        response.headers["cache-control"]
        == f"public, max-age={int(api.settings.retention_seconds)}, immutable"
    )
    etag = response.headers["etag"]
    assert etag
    assert api.client.get(f"/files/{png}", headers={"if-none-match": etag}).status_code == 304
    assert api.client.get(f"/files/{jpeg}").headers["content-type"] == "image/jpeg"
    assert api.client.head(f"/files/{png}").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/files/../queue.sqlite3",
        "/files/..%2Fqueue.sqlite3",
        "/files/%2e%2e%2fqueue.sqlite3",
        "/files/queue.sqlite3",
        "/files/.hidden.png",
        "/files/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.png",
        "/files/",
        "/files/%00.png",
    ],
)
def test_files_route_refuses_anything_but_stored_names(api, path):
    (api.settings.data_dir / "secret.png").write_bytes(b"secret")
    response = httpx.get(api.base_url + path)
    assert response.status_code == 404
    assert b"secret" not in response.content and b"SQLite" not in response.content


def test_unknown_routes_and_methods_use_fal_error_shape(api):
    response = api.client.get("/nothing-here")
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}
    response = api.client.get("/fal-ai/flux/dev")
    assert response.status_code == 405 and "detail" in response.json()


def test_purge_deletes_old_results_and_their_files(api):
    request_id = api.submit()["request_id"]
    api.complete(api.claim(request_id))
    url = api.client.get(f"/fal-ai/flux/requests/{request_id}").json()["images"][0]["url"]
    assert httpx.get(url).status_code == 200
    queue, storage = api.app.state.queue, api.app.state.storage
    assert asyncio.run(purge_expired(queue, storage, time.time() - 3600)) == 0
    assert asyncio.run(purge_expired(queue, storage, time.time() + 1)) >= 1
    assert httpx.get(url).status_code == 404
    assert api.client.get(f"/fal-ai/flux/requests/{request_id}").status_code == 404


@pytest.mark.anyio
async def test_protocols_can_claim_their_error_shape(tmp_path):
    app = create_app(api_settings(tmp_path))
    router = APIRouter()

    @router.get("/v9/thing/{n}")
    async def thing(n: int) -> dict:
        return {"n": n}

    app.include_router(router)

    async def render(request, exc) -> JSONResponse:
        return JSONResponse({"error": type(exc).__name__}, status_code=getattr(exc, "status_code", 422))

    register_error_renderer(app, "/v9/", render)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/v9/thing/3")).json() == {"n": 3}
        invalid = await client.get("/v9/thing/x")
        assert (invalid.status_code, invalid.json()) == (422, {"error": "RequestValidationError"})
        missing = await client.get("/v9/nope")
        assert (missing.status_code, missing.json()) == (404, {"error": "HTTPException"})
        # Paths nobody claimed keep fal's shape.
        fal = await client.post("/fal-ai/flux/dev", json={})
        assert fal.status_code == 422 and fal.json()["detail"][0]["loc"] == ["body", "prompt"]
        assert (await client.get("/other")).json() == {"detail": "Not Found"}
    app.state.queue.close()


def test_public_url_setting_wins_for_returned_urls(tmp_path):
    with run_api_server(api_settings(tmp_path, public_url="https://flux.example:8443/")) as api:
        body = api.submit()
        assert body["status_url"].startswith("https://flux.example:8443/fal-ai/flux/requests/")


FORWARDED = {"x-forwarded-proto": "https", "x-forwarded-host": "gpu.example"}


def test_forwarded_headers_count_only_from_trusted_proxies(api, tmp_path):
    # The shared server trusts no proxy: a client cannot choose the host of returned links.
    body = api.submit(headers=FORWARDED)
    assert body["response_url"].startswith(f"{api.base_url}/fal-ai/flux/requests/")
    with run_api_server(api_settings(tmp_path, trusted_proxy=["127.0.0.0/8"])) as behind_proxy:
        body = behind_proxy.submit(headers=FORWARDED)
        assert body["response_url"].startswith("https://gpu.example/fal-ai/flux/requests/")
    with run_api_server(api_settings(tmp_path / "other", trusted_proxy=["10.1.2.3"])) as elsewhere:
        body = elsewhere.submit(headers=FORWARDED)
        assert body["response_url"].startswith(f"{elsewhere.base_url}/fal-ai/flux/requests/")


def test_api_refuses_public_host_without_a_key(tmp_path, capsys):
    settings = Settings(data_dir=tmp_path, host="0.0.0.0", api_key=[])
    assert unsafe_listen_reason(settings) is not None
    assert run_api(settings) == EXIT_UNSAFE
    assert "--api-key" in capsys.readouterr().err
    assert unsafe_listen_reason(Settings(data_dir=tmp_path, host="0.0.0.0", api_key=["k"])) is None
    assert unsafe_listen_reason(Settings(data_dir=tmp_path, host="0.0.0.0", insecure_no_auth=True)) is None
    assert unsafe_listen_reason(Settings(data_dir=tmp_path, host="127.0.0.1")) is None
    assert unsafe_listen_reason(Settings(data_dir=tmp_path, host="localhost")) is None


@pytest.mark.anyio
async def test_background_hooks_run_with_the_app_and_stop_with_it(tmp_path):
    app = create_app(api_settings(tmp_path))
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hook() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    app.state.background.append(hook)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(started.wait(), 5)
        assert not cancelled.is_set()
    assert cancelled.is_set()


def test_every_name_the_storage_makes_is_served(api):
    # Stored names are random URL-safe tokens: they may start with '-' or '_'.
    storage = LocalStorage(api.settings.files_dir)
    names = [storage.save(b"x", "png") for _ in range(500)]
    assert any(name[0] in "-_" for name in names)
    for name in names:
        if name[0] in "-_":
            assert api.client.get(f"/files/{name}").status_code == 200


def test_fals_patterns_come_first_and_never_take_another_routes_path(tmp_path):
    """fal's routes are tried first (server/api/app.py); their `{owner}` must exclude the first
    segment of every other route, or a fal pattern would answer that route's requests."""
    from server.api.protocols.fal.queue_routes import FalOwner

    app = create_app(api_settings(tmp_path))
    fal = [route for route in app.routes if getattr(route, "path", "").startswith("/{owner:fal_owner}/")]
    assert fal and app.routes.index(fal[-1]) == len(fal)  # right after FastAPI's /openapi.json
    others = {route.path.split("/")[1] for route in app.routes if route not in fal}
    assert others - {""} <= set(FalOwner.RESERVED)  # "": the playground's "/"


@pytest.mark.parametrize(
    ("method", "path", "status", "answer"),
    [
        ("POST", "/storage/auth/token", 200, "token"),  # fal storage's, not a submit to "auth/token"
        ("POST", "/v1/images/generations", 400, "error"),  # OpenAI's (its shape), not fal's
        ("GET", "/files/a/requests/b", 404, "File not found"),  # a file, not a fal status route
        ("GET", "/fal-ai/flux/requests/b", 404, "Request not found"),  # fal's status route
        ("POST", "/fal-ai/flux/dev", 422, "prompt"),  # fal's submit, with an empty body
    ],
)
def test_each_path_reaches_its_own_route(api, method, path, status, answer):
    response = api.client.request(method, path, json={})
    assert response.status_code == status and answer in response.text, response.text
