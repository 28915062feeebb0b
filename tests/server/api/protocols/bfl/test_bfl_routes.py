"""BFL routes in-process (real app, real SQLite queue, no worker): auth, validation in BFL's
422 shape, submit answers, status mapping of finished records."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from server.api.app import create_app
from server.api.protocols.bfl.adapter import record_to_result
from server.config import Settings
from server.jobs import REDUX_INPUT_SIDE, Job, JobError, JobRecord, JobResult, OutputImage, Status
from tests.support import png_header_only

KEY = {"x-key": "bfl-key"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, api_key=["bfl-key"], webhook_allowlist=["hooks.example.com"])
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_auth_uses_x_key(client: TestClient) -> None:
    missing = client.post("/v1/flux-dev", json={"prompt": "a"})
    assert missing.status_code == 401 and isinstance(missing.json()["detail"], str)
    wrong = client.get("/v1/get_result", params={"id": "x"}, headers={"x-key": "nope"})
    assert wrong.status_code == 403 and isinstance(wrong.json()["detail"], str)


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"prompt": "a", "width": 1000}, ["body", "width"]),
        ({"prompt": "a", "height": 1472}, ["body", "height"]),
        ({"prompt": "a", "steps": 51}, ["body", "steps"]),
        ({"prompt": "a", "guidance": 1.0}, ["body", "guidance"]),
        ({"prompt": "a", "safety_tolerance": 7}, ["body", "safety_tolerance"]),
        ({"prompt": "a", "output_format": "gif"}, ["body", "output_format"]),
        ({"width": 512}, ["body"]),
        ({"image_prompt": "not base64!"}, ["body", "image_prompt"]),
        ({"prompt": "a", "webhook_url": "https://evil.example.org/h"}, ["body", "webhook_url"]),
    ],
)
def test_validation_errors_in_bfl_shape(client: TestClient, body: dict, loc: list) -> None:
    response = client.post("/v1/flux-dev", json=body, headers=KEY)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert set(error) == {"loc", "msg", "type"}
    assert error["loc"] == loc and error["msg"]


def test_get_result_without_id_is_422(client: TestClient) -> None:
    response = client.get("/v1/get_result", headers=KEY)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "id"]


def test_submit_answers_id_and_absolute_polling_url(client: TestClient) -> None:
    response = client.post("/v1/flux-dev", json={"prompt": "a fox", "width": 256, "height": 256}, headers=KEY)
    assert response.status_code == 200
    body = response.json()
    assert body["polling_url"] == f"http://testserver/v1/get_result?id={body['id']}"
    record = client.app.state.queue.get(body["id"])
    assert record.job.protocol == "bfl" and record.job.safety_tolerance == 2
    assert (record.job.width, record.job.height, record.job.num_inference_steps) == (256, 256, 28)
    assert record.job.guidance_scale == 3.0 and record.job.output_format == "jpeg"
    poll = client.get("/v1/get_result", params={"id": body["id"]}, headers=KEY).json()
    assert poll["status"] == "Pending" and poll["result"] is None and 0 <= poll["progress"] <= 1

    unknown = client.get("/v1/get_result", params={"id": "nope"}, headers=KEY).json()
    assert unknown["status"] == "Task not found" and unknown["id"] == "nope"


def test_image_prompt_makes_a_redux_job_and_webhook_shape(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="JPEG")
    body = {
        "image_prompt": base64.b64encode(buffer.getvalue()).decode(),
        "webhook_url": "https://hooks.example.com/bfl",
        "webhook_secret": "sh",
        "prompt_upsampling": True,
    }
    response = client.post("/v1/flux-dev", json=body, headers=KEY)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == "Pending" and answer["webhook_url"] == "https://hooks.example.com/bfl"
    queue = client.app.state.queue
    assert queue.get(answer["id"]).job.image is None  # only the worker that claims it reads it
    job = queue.claim("w1", timeout=0).job
    assert job.task == "redux" and job.image is not None
    assert Image.open(io.BytesIO(job.image)).format == "PNG"
    assert Image.open(io.BytesIO(job.image)).size == (40, 30)  # smaller than SigLIP's: as sent
    assert job.webhook.kind == "bfl" and job.webhook.secret == "sh"


def finished(**kwargs: object) -> JobRecord:
    job = Job(prompt="p", width=256, height=256, safety_tolerance=2, protocol="bfl", base_url="http://h:1")
    now = time.time()
    return JobRecord(id="r", job=job, status=Status.COMPLETED, started_at=now - 2, completed_at=now, **kwargs)


def result(flagged: bool = False, checked: bool = True) -> JobResult:
    image = OutputImage(width=256, height=256, content_type="image/jpeg", file_name="n.jpeg", file_size=3)
    return JobResult(
        images=[image],
        seed=5,
        prompt="p",
        has_nsfw_concepts=[flagged],
        nsfw_checked=checked,
        timings={},
        preset="none",
    )


def test_status_mapping() -> None:
    ready = record_to_result(finished(result=result()), "r")
    assert ready.status == "Ready" and ready.progress == 1.0
    assert ready.result["sample"] == "http://h:1/files/n.jpeg" and ready.result["seed"] == 5
    assert ready.result["duration"] == pytest.approx(2.0, abs=0.01)

    unchecked = record_to_result(finished(result=result(checked=False)), "r")
    assert unchecked.status == "Ready" and unchecked.details["safety"] == "unchecked"

    moderated = record_to_result(finished(result=result(flagged=True)), "r")
    assert moderated.status == "Content Moderated" and moderated.result is None

    error = JobError(message="bad", error_type="internal", status_code=500)
    failed = record_to_result(finished(error=error), "r")
    assert failed.status == "Error" and failed.details == {"error_type": "internal", "message": "bad"}

    refused = JobError(message="prompt refused", error_type="content_policy_violation", status_code=422)
    assert record_to_result(finished(error=refused), "r").status == "Request Moderated"


def test_an_image_prompt_is_stored_at_the_redux_encoder_size(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (600, 500), (20, 200, 10)).save(buffer, format="PNG")
    body = {"prompt": "p", "image_prompt": base64.b64encode(buffer.getvalue()).decode()}
    response = client.post("/v1/flux-dev", json=body, headers=KEY)
    assert response.status_code == 200, response.text
    job = client.app.state.queue.claim("w1", timeout=0).job
    assert Image.open(io.BytesIO(job.image)).size == (REDUX_INPUT_SIDE, REDUX_INPUT_SIDE)


def test_an_image_prompt_too_large_by_its_header_is_a_422(client: TestClient) -> None:
    body = {"image_prompt": base64.b64encode(png_header_only(20000, 20000)).decode()}
    response = client.post("/v1/flux-dev", json=body, headers=KEY)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "image_prompt"] and error["type"] == "image_too_large"
