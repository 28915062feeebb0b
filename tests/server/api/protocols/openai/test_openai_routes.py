"""OpenAI routes in-process (real app, real SQLite queue, no worker): auth, errors in OpenAI's
shape, size parsing, models list, and the mapping of job errors."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.api.app import create_app
from server.api.protocols.openai import adapter
from server.api.protocols.openai.adapter import OpenAIError
from server.config import Settings
from server.jobs import JobError
from tests.server.conftest import ApiServer, png_bytes
from tests.support import png_header_only

AUTH = {"Authorization": "Bearer oa-key"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, api_key=["oa-key"], model=str(tmp_path / "FLUX.1-dev"))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


def test_bad_or_missing_key_is_401(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        error = assert_openai_error(client.get("/v1/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "n": 5}, "n"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"n": 1}, "prompt"),
        ({"prompt": "a", "size": "huge"}, "size"),
        ({"prompt": "a", "size": "4096x4096"}, "size"),
        ({"prompt": "a", "response_format": "jpeg"}, "response_format"),
    ],
)
def test_generation_errors_are_400(client: TestClient, body: dict, param: str) -> None:
    error = assert_openai_error(client.post("/v1/images/generations", json=body, headers=AUTH), 400, param)
    assert error["type"] == "invalid_request_error"


def test_edit_errors_are_400(client: TestClient) -> None:
    no_image = client.post(
        "/v1/images/edits", data={"prompt": "a"}, files={"mask": ("m", b"x")}, headers=AUTH
    )
    assert_openai_error(no_image, 400, "image")
    not_an_image = client.post(
        "/v1/images/edits", data={"prompt": "a"}, files={"image": ("a.png", b"xx")}, headers=AUTH
    )
    assert_openai_error(not_an_image, 400, "image")
    json_body = client.post("/v1/images/edits", json={"prompt": "a"}, headers=AUTH)
    assert_openai_error(json_body, 400)
    huge = ("a.png", png_header_only(20000, 20000), "image/png")
    too_large = client.post("/v1/images/edits", data={"prompt": "a"}, files={"image": huge}, headers=AUTH)
    assert assert_openai_error(too_large, 400, "image")["code"] == "image_too_large"
    bad_size = client.post(
        "/v1/images/edits", data={"prompt": "a", "size": "huge"}, files={"image": huge}, headers=AUTH
    )
    assert_openai_error(bad_size, 400, "size")  # refused before the image is read


def test_models_list_and_retrieve(client: TestClient) -> None:
    listed = client.get("/v1/models", headers=AUTH).json()
    assert listed["object"] == "list"
    assert [model["id"] for model in listed["data"]] == ["flux.1-dev", "FLUX.1-dev"]
    assert client.get("/v1/models/flux.1-dev", headers=AUTH).json()["id"] == "flux.1-dev"
    assert_openai_error(client.get("/v1/models/dall-e-3", headers=AUTH), 404, "model")


def test_size_parsing() -> None:
    assert adapter.parse_size(None) == adapter.parse_size("auto") == (1024, 1024)
    assert adapter.parse_size("1024x768") == (1024, 768)
    assert adapter.parse_size("1000x700") == (1008, 704)  # rounded to multiples of 16
    for bad in ("1024", "x", "-5x10", "10x10", "1024*768"):
        with pytest.raises(OpenAIError):
            adapter.parse_size(bad)
    assert adapter.edit_size(None, 2000, 1000) == (1024, 512)
    assert adapter.edit_size("auto", 300, 200) == (304, 208)
    assert adapter.edit_size("512x512", 300, 200) == (512, 512)


def test_job_errors_map_to_openai_statuses() -> None:
    client_fault = adapter.job_error(
        JobError(message="bad size", error_type="invalid_input", status_code=422)
    )
    assert (client_fault.status_code, client_fault.error_type) == (400, "invalid_request_error")
    crash = adapter.job_error(JobError(message="oom", error_type="internal", status_code=500))
    assert (crash.status_code, crash.error_type) == (500, "server_error")
    lost = adapter.job_error(JobError(message="gone", error_type="runner_disconnected", status_code=503))
    assert (lost.status_code, lost.error_type) == (503, "server_error")


def test_an_edit_input_is_stored_at_the_output_size(api: ApiServer) -> None:
    """The worker gets the image at the size the edit makes ("auto": the input's, its longest
    side scaled to 1024), as the model would resize it."""
    picture = ("in.png", png_bytes(1500, 1000), "image/png")
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            api.client.post, "/v1/images/edits", data={"prompt": "winter"}, files={"image": picture}
        )
        record = api.claim()
        assert (record.job.width, record.job.height) == (1024, 688)
        assert Image.open(io.BytesIO(record.job.image)).size == (1024, 688)
        api.complete(record)
        assert answer.result(timeout=20).status_code == 200
