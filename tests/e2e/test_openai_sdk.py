"""The real `openai` SDK against a running flux-server (tiny model, same queue and workers)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

FAST = {"steps": 2, "seed": 11}  # extensions: few steps keep the tiny model quick


def sdk(server, api_key: str = "unused") -> openai.OpenAI:
    http_client = httpx.Client(verify=server.verify, timeout=120.0)
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=api_key, http_client=http_client, max_retries=0
    )


@pytest.fixture(scope="module")
def client(flux_server) -> Iterator[openai.OpenAI]:
    with sdk(flux_server) as c:
        yield c


def test_generate_urls(client: openai.OpenAI, flux_server) -> None:
    response = client.images.generate(
        model="flux.1-dev", prompt="a lighthouse", n=2, size="96x64", extra_body=FAST
    )
    assert isinstance(response.created, int)
    assert len(response.data) == 2
    with httpx.Client(verify=flux_server.verify) as http:
        for item in response.data:
            assert item.url and item.url.startswith(flux_server.base_url)
            download = http.get(item.url)
            assert download.status_code == 200 and download.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(download.content)).size == (96, 64)


def test_generate_b64_json(client: openai.OpenAI) -> None:
    response = client.images.generate(
        prompt="a lighthouse",
        size="64x128",
        response_format="b64_json",
        extra_body={**FAST, "output_format": "jpeg"},
    )
    (item,) = response.data
    assert item.url is None
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert image.format == "JPEG" and image.size == (64, 128)


def test_edit_with_a_real_png(client: openai.OpenAI) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 80), (30, 140, 200)).save(buffer, format="PNG")
    response = client.images.edit(
        image=("input.png", buffer.getvalue(), "image/png"),
        prompt="make it sunset",
        size="64x64",
        response_format="b64_json",
        extra_body={"steps": 4, "strength": 0.5, "seed": 3},
    )
    (item,) = response.data
    assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (64, 64)


def test_models_list(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert "flux.1-dev" in ids


def test_bad_requests_raise_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as invalid_size:
        client.images.generate(prompt="x", size="banana", extra_body=FAST)  # type: ignore[arg-type]
    assert invalid_size.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.images.generate(prompt="x", n=5, extra_body=FAST)
    assert too_many.value.body["param"] == "n"


def test_bad_key_raises_authentication_error(auth_server) -> None:
    with sdk(auth_server, api_key="definitely-wrong") as client, pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="x", extra_body=FAST)
