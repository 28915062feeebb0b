"""Limits and trust on a real API over loopback: one request-size limit (413 in each
protocol's shape), the prompt-length limit, BFL's get_result only for BFL requests, CORS."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import api_settings, png_bytes, run_api_server

LIMIT = 64 * 1024
ORIGIN = "http://127.0.0.1:9"  # a page served elsewhere on the studio's network


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    settings = api_settings(
        tmp_path_factory.mktemp("limits"),
        max_request_bytes=LIMIT,
        max_prompt_length=100,
        cors_origin=[ORIGIN],
    )
    with run_api_server(settings) as server:
        yield server


@pytest.fixture
def api_limited(limited) -> Iterator:
    limited.drain()
    yield limited
    limited.drain()


BIG_PROMPT = "x" * (LIMIT + 1)


def chunks(total: int, size: int = 8192) -> Iterator[bytes]:
    """A body without Content-Length (chunked): the limit must hold while it arrives."""
    yield b'{"prompt": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_bodies_are_413_in_each_protocol_shape(api_limited, chunked) -> None:
    client = api_limited.client

    def post_json(path: str) -> httpx.Response:
        if chunked:
            return client.post(path, content=chunks(LIMIT * 2), headers={"content-type": "application/json"})
        return client.post(path, json={"prompt": BIG_PROMPT})

    fal = post_json("/fal-ai/flux/dev")
    assert fal.status_code == 413 and isinstance(fal.json()["detail"], str), fal.text
    bfl = post_json("/v1/flux-dev")
    assert bfl.status_code == 413 and isinstance(bfl.json()["detail"], str), bfl.text
    openai = post_json("/v1/images/generations")
    assert openai.status_code == 413, openai.text
    assert set(openai.json()["error"]) == {"message", "type", "param", "code"}
    assert api_limited.worker.depth() == 0


def test_oversized_multipart_upload_is_413_in_openai_shape(api_limited) -> None:
    upload = io.BytesIO(png_bytes(64, 64) + b"\0" * LIMIT)
    response = api_limited.client.post(
        "/v1/images/edits", files={"image": ("in.png", upload, "image/png")}, data={"prompt": "p"}
    )
    assert response.status_code == 413, response.text
    assert "larger than" in response.json()["error"]["message"]


def test_fal_storage_uploads_keep_their_own_larger_limit(api_limited) -> None:
    """File uploads are not requests to generate: --max-upload-bytes applies to them."""
    response = api_limited.client.post(
        "/files/upload",
        content=png_bytes(64, 64) + b"\0" * (LIMIT * 2),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    assert "/files/" in response.json()["access_url"]


def test_a_body_within_the_limit_is_accepted(api_limited) -> None:
    assert api_limited.client.post("/fal-ai/flux/dev", json={"prompt": "fits"}).status_code == 200


def test_long_prompts_are_refused_in_each_protocol_shape(api_limited) -> None:
    client = api_limited.client
    prompt = "y" * 101
    fal = client.post("/fal-ai/flux/dev", json={"prompt": prompt})
    assert fal.status_code == 422
    (error,) = fal.json()["detail"]
    assert error["loc"] == ["body", "prompt"] and error["type"] == "string_too_long"
    bfl = client.post("/v1/flux-dev", json={"prompt": prompt})
    assert bfl.status_code == 422 and bfl.json()["detail"][0]["loc"] == ["body", "prompt"]
    openai = client.post("/v1/images/generations", json={"prompt": prompt})
    assert openai.status_code == 400
    assert openai.json()["error"]["code"] == "string_above_max_length"
    assert openai.json()["error"]["param"] == "prompt"
    assert api_limited.worker.depth() == 0
    assert client.post("/fal-ai/flux/dev", json={"prompt": "y" * 100}).status_code == 200


def test_get_result_answers_only_for_bfl_requests(api_limited) -> None:
    client = api_limited.client
    fal_id = api_limited.submit()["request_id"]
    assert client.get("/v1/get_result", params={"id": fal_id}).json()["status"] == "Task not found"
    bfl_id = client.post("/v1/flux-dev", json={"prompt": "p"}).json()["id"]
    assert client.get("/v1/get_result", params={"id": bfl_id}).json()["status"] == "Pending"


def test_cors_preflight_and_answers_for_listed_origins_only(api_limited) -> None:
    client = api_limited.client
    preflight = client.options(
        "/api/fal/proxy",
        headers={
            "origin": ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type,x-fal-target-url",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in preflight.headers["access-control-allow-methods"]
    answer = client.post("/fal-ai/flux/dev", json={"prompt": "p"}, headers={"origin": ORIGIN})
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-fal-request-id" in answer.headers["access-control-expose-headers"]
    stranger = client.post("/fal-ai/flux/dev", json={"prompt": "p"}, headers={"origin": "http://elsewhere"})
    assert "access-control-allow-origin" not in stranger.headers


def test_cors_is_off_by_default(api) -> None:
    answer = api.client.post("/fal-ai/flux/dev", json={"prompt": "p"}, headers={"origin": ORIGIN})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
    preflight = api.client.options(
        "/api/fal/proxy", headers={"origin": ORIGIN, "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
