"""fal queue API over real HTTP: submit, status, status stream, result, cancel, validation."""

from __future__ import annotations

import base64
import io
import itertools
import json
import threading
import time

import httpx
import pytest
from PIL import Image

from server.jobs import REDUX_INPUT_SIDE, JobError, Status
from tests.server.conftest import png_bytes
from tests.support import error_body, png_header_only, wait_until

PNG_URI = "data:image/png;base64," + base64.b64encode(png_bytes(100, 70)).decode()


@pytest.mark.parametrize(
    ("path", "app_id", "body"),
    [
        ("/fal-ai/flux/dev", "fal-ai/flux", {"prompt": "a cat"}),
        ("/fal-ai/flux-1/dev", "fal-ai/flux-1", {"prompt": "a cat"}),
        ("/fal-ai/flux/dev/image-to-image", "fal-ai/flux", {"prompt": "a cat", "image_url": PNG_URI}),
        ("/fal-ai/flux-1/dev/redux", "fal-ai/flux-1", {"image_url": PNG_URI}),
    ],
)
def test_submit_returns_absolute_urls_on_the_app(api, path, app_id, body):
    response = api.client.post(path, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    request_id = data["request_id"]
    assert response.headers["x-fal-request-id"] == request_id
    assert data["gateway_request_id"] == request_id
    assert data["status"] == "IN_QUEUE"
    assert data["queue_position"] == 0
    assert data["logs"] is None and data["metrics"] == {}
    base = f"{api.base_url}/{app_id}/requests/{request_id}"
    assert data["response_url"] == base
    assert data["status_url"] == base + "/status"
    assert data["cancel_url"] == base + "/cancel"
    record = api.worker.get(request_id)
    assert record.job.app_id == app_id and record.job.protocol == "fal"
    assert record.job.endpoint == path.split("/", 3)[3]
    assert record.job.seed is not None and 0 <= record.job.seed < 2**53
    assert record.job.base_url == api.base_url


def test_submit_maps_inputs_to_the_job(api):
    t2i = api.submit(body={"prompt": "p", "image_size": {"width": 1000, "height": 500}, "seed": 7})
    job = api.worker.get(t2i["request_id"]).job
    assert (job.task, job.width, job.height, job.seed, job.num_inference_steps) == (
        "text-to-image",
        1008,
        496,
        7,
        28,
    )
    assert job.acceleration == "none"  # fal-ai/flux/dev's documented default
    preset = api.submit(
        body={"prompt": "p", "image_size": "portrait_16_9", "sync_mode": True, "num_images": 2}
    )
    job = api.worker.get(preset["request_id"]).job
    assert (job.width, job.height, job.inline_images, job.num_images) == (576, 1024, True, 2)
    api.drain()  # the next job is the queue's head: the test claims it to see its input image

    i2i = api.submit(
        "/fal-ai/flux/dev/image-to-image", {"prompt": "p", "image_url": PNG_URI, "strength": 0.5}
    )
    job = api.claim(i2i["request_id"]).job
    # The output follows the input image (100x70), rounded to multiples of 16.
    assert (job.task, job.width, job.height, job.strength, job.num_inference_steps) == (
        "image-to-image",
        96,
        64,
        0.5,
        40,
    )
    assert job.image is not None and job.image.startswith(b"\x89PNG")

    redux = api.submit("/fal-ai/flux/dev/redux", {"prompt": "ignored", "image_url": PNG_URI})
    job = api.worker.get(redux["request_id"]).job
    assert (job.task, job.prompt, job.width, job.height) == ("redux", "", 1024, 768)


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_input_images_are_shrunk_at_submit_to_what_the_model_uses(api):
    """The worker gets each input at the size the model resizes it to."""
    i2i = api.submit("/fal-ai/flux/dev/image-to-image", {"prompt": "p", "image_url": PNG_URI})["request_id"]
    job = api.claim(i2i).job
    # 100x70 in, 96x64 out (rounded to 16 px): stored at the output size, as the model uses it.
    assert (job.width, job.height) == (96, 64) and Image.open(io.BytesIO(job.image)).size == (96, 64)

    big = data_uri(png_bytes(500, 400))
    redux = api.submit("/fal-ai/flux/dev/redux", {"image_url": big})["request_id"]
    job = api.claim(redux).job
    assert (job.width, job.height) == (1024, 768)  # the output size is the request's own
    assert Image.open(io.BytesIO(job.image)).size == (REDUX_INPUT_SIDE, REDUX_INPUT_SIDE)


@pytest.mark.parametrize("path", ["/fal-ai/flux/dev/image-to-image", "/fal-ai/flux/dev/redux"])
def test_an_image_too_large_by_its_header_is_a_422(api, path):
    response = api.client.post(
        path, json={"prompt": "p", "image_url": data_uri(png_header_only(20000, 20000))}
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "image_url"] and error["type"] == "image_too_large"
    assert api.worker.depth() == 0


def test_status_codes_positions_and_logs(api):
    first = api.submit()["request_id"]
    second = api.submit()["request_id"]
    for query in ("", "?logs=0", "?logs=1", "?logs=true", "?logs=false"):
        response = api.client.get(f"/fal-ai/flux/requests/{second}/status{query}")
        assert response.status_code == 202
        body = response.json()
        assert body["status"] == "IN_QUEUE" and body["queue_position"] == 1
        assert body["logs"] == [] and response.headers["x-fal-request-id"] == second

    record = api.claim(first)
    api.worker.log(first, "step 1/2", progress=0.5)
    running = api.client.get(f"/fal-ai/flux/requests/{first}/status?logs=1")
    assert running.status_code == 202
    body = running.json()
    assert body["status"] == "IN_PROGRESS" and "queue_position" not in body
    assert [entry["message"] for entry in body["logs"]][-1] == "step 1/2"
    assert set(body["logs"][-1]) >= {"message", "level", "source", "timestamp"}
    assert api.client.get(f"/fal-ai/flux/requests/{first}/status?logs=0").json()["logs"] == []
    assert api.client.get(f"/fal-ai/flux/requests/{second}/status").json()["queue_position"] == 0

    api.complete(record)
    done = api.client.get(f"/fal-ai/flux/requests/{first}/status")
    assert done.status_code == 200
    assert done.json()["status"] == "COMPLETED"
    assert done.json()["metrics"] == {"inference_time": 0.25}
    assert "error" not in done.json()


def test_status_is_per_app_and_unknown_ids_are_404(api):
    request_id = api.submit("/fal-ai/flux/dev/image-to-image", {"prompt": "p", "image_url": PNG_URI})[
        "request_id"
    ]
    # Found on the app whatever subpath it was submitted on, but not on another app.
    assert api.client.get(f"/fal-ai/flux/requests/{request_id}/status").status_code == 202
    other = api.client.get(f"/fal-ai/flux-1/requests/{request_id}/status")
    assert other.status_code == 404 and other.json() == {"detail": "Request not found"}
    assert other.headers["x-fal-request-id"] == request_id
    assert api.client.get("/fal-ai/flux/requests/nope/status").status_code == 404
    assert api.client.get("/fal-ai/flux/requests/nope").status_code == 404


def test_result_success_is_the_raw_output(api):
    request_id = api.submit(body={"prompt": "a red square", "image_size": "square", "num_images": 2})[
        "request_id"
    ]
    not_ready = api.client.get(f"/fal-ai/flux/requests/{request_id}")
    assert not_ready.status_code == 400
    assert not_ready.json() == {"detail": "Request is still in progress"}
    record = api.claim(request_id)
    assert api.client.get(f"/fal-ai/flux/requests/{request_id}").status_code == 400
    api.complete(record)

    response = api.client.get(f"/fal-ai/flux/requests/{request_id}")
    assert response.status_code == 200
    assert response.headers["x-fal-request-id"] == request_id
    output = response.json()
    assert set(output) >= {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    assert output["seed"] == record.job.seed and output["prompt"] == "a red square"
    assert output["has_nsfw_concepts"] == [False, False]
    assert output["timings"]["inference"] == 0.25
    assert output["acceleration"] == record.job.acceleration
    assert len(output["images"]) == 2
    image = output["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/png")
    assert image["url"] == f"{api.base_url}/files/{image['file_name']}"
    fetched = httpx.get(image["url"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert len(fetched.content) == image["file_size"]


def test_result_of_sync_mode_is_inline(api):
    request_id = api.submit(body={"prompt": "p", "image_size": "square", "sync_mode": True})["request_id"]
    api.complete(api.claim(request_id))
    image = api.client.get(f"/fal-ai/flux/requests/{request_id}").json()["images"][0]
    assert image["url"].startswith("data:image/png;base64,")


def test_result_failure_returns_the_error_status_and_body(api):
    request_id = api.submit()["request_id"]
    record = api.claim(request_id)
    api.fail(record, JobError(message="CUDA out of memory", error_type="internal_server_error"))
    status = api.client.get(f"/fal-ai/flux/requests/{request_id}/status").json()
    assert status["status"] == "COMPLETED"
    assert (status["error"], status["error_type"]) == ("CUDA out of memory", "internal_server_error")
    response = api.client.get(f"/fal-ai/flux/requests/{request_id}")
    assert response.status_code == 500
    assert error_body(response) == {"detail": "CUDA out of memory", "error_type": "internal_server_error"}
    assert response.headers["x-fal-error-type"] == "internal_server_error"
    assert response.headers["x-fal-request-id"] == request_id

    body = {"detail": [{"loc": ["body", "prompt"], "msg": "bad", "type": "content_policy_violation"}]}
    request_id = api.submit()["request_id"]
    api.fail(
        api.claim(request_id),
        JobError(message="bad", error_type="content_policy_violation", status_code=422, body=body),
    )
    response = api.client.get(f"/fal-ai/flux/requests/{request_id}")
    assert (response.status_code, response.json()) == (422, body)


def test_cancel_queued_running_finished_unknown(api):
    queued = api.submit()["request_id"]
    response = api.client.put(f"/fal-ai/flux/requests/{queued}/cancel")
    assert (response.status_code, response.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert response.headers["x-fal-request-id"] == queued
    status = api.client.get(f"/fal-ai/flux/requests/{queued}/status")
    assert status.status_code == 200
    assert status.json()["status"] == "COMPLETED" and status.json()["error_type"] == "request_cancelled"
    result = api.client.get(f"/fal-ai/flux/requests/{queued}")
    assert result.status_code == 400 and result.headers["x-fal-error-type"] == "request_cancelled"

    again = api.client.put(f"/fal-ai/flux/requests/{queued}/cancel")
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})

    running = api.submit()["request_id"]
    record = api.claim(running)
    response = api.client.put(f"/fal-ai/flux/requests/{running}/cancel")
    assert (response.status_code, response.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert api.worker.is_cancel_requested(running)
    api.fail(
        record, JobError(message="Request was cancelled", error_type="request_cancelled", status_code=400)
    )

    unknown = api.client.put("/fal-ai/flux/requests/does-not-exist/cancel")
    assert (unknown.status_code, unknown.json()) == (404, {"status": "NOT_FOUND"})
    other_app = api.client.put(f"/fal-ai/flux-1/requests/{running}/cancel")
    assert other_app.status_code == 404


def test_trailing_slashes_are_tolerated(api):
    request_id = api.submit("/fal-ai/flux/dev/")["request_id"]
    assert api.client.get(f"/fal-ai/flux/requests/{request_id}/status/").status_code == 202
    assert api.client.get(f"/fal-ai/flux/requests/{request_id}/").status_code == 400
    api.complete(api.claim(request_id))
    assert api.client.get(f"/fal-ai/flux/requests/{request_id}/status/?logs=1").status_code == 200
    assert api.client.get(f"/fal-ai/flux/requests/{request_id}/").status_code == 200
    assert api.client.put(f"/fal-ai/flux/requests/{request_id}/cancel/").status_code == 400


def detail_of(response: httpx.Response) -> dict:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    for entry in detail:
        assert {"loc", "msg", "type"} <= set(entry)
    return detail[0]


@pytest.mark.parametrize(
    ("body", "loc", "error_type"),
    [
        ({}, ["body", "prompt"], "missing"),
        ({"prompt": "p", "num_images": 5}, ["body", "num_images"], "less_than_equal"),
        ({"prompt": "p", "num_inference_steps": 0}, ["body", "num_inference_steps"], "greater_than_equal"),
        ({"prompt": "p", "guidance_scale": 25}, ["body", "guidance_scale"], "less_than_equal"),
        ({"prompt": "p", "seed": 2**64}, ["body", "seed"], "less_than"),
        ({"prompt": "p", "seed": -1}, ["body", "seed"], "greater_than_equal"),
        ({"prompt": "p", "output_format": "gif"}, ["body", "output_format"], "literal_error"),
        ({"prompt": "p", "image_size": "huge"}, ["body", "image_size"], "value_error"),
        (
            {"prompt": "p", "image_size": {"width": 4096, "height": 4096}},
            ["body", "image_size"],
            "value_error",
        ),
        ({"prompt": "p", "image_size": {"width": 16, "height": 512}}, ["body", "image_size"], "value_error"),
    ],
)
def test_invalid_text_to_image_input_is_422(api, body, loc, error_type):
    error = detail_of(api.client.post("/fal-ai/flux/dev", json=body))
    assert error["loc"] == loc and error["type"] == error_type
    assert api.worker.depth() == 0


@pytest.mark.parametrize(
    ("path", "body", "loc", "error_type"),
    [
        ("/fal-ai/flux/dev/image-to-image", {"prompt": "p"}, ["body", "image_url"], "missing"),
        (
            "/fal-ai/flux/dev/image-to-image",
            {"prompt": "p", "image_url": PNG_URI, "strength": 0},
            ["body", "strength"],
            "greater_than_equal",
        ),
        (
            "/fal-ai/flux/dev/image-to-image",
            {"prompt": "p", "image_url": PNG_URI, "num_inference_steps": 5},
            ["body", "num_inference_steps"],
            "greater_than_equal",
        ),
        (
            "/fal-ai/flux/dev/image-to-image",
            {"prompt": "p", "image_url": "data:image/png;base64,AAAA"},
            ["body", "image_url"],
            "image_load_error",
        ),
        (
            "/fal-ai/flux/dev/redux",
            {"image_url": "ftp://example.com/x.png"},
            ["body", "image_url"],
            "file_download_error",
        ),
        (
            "/fal-ai/flux/dev/redux",
            {
                "image_url": "data:image/png;base64," + base64.b64encode(png_bytes(8, 8)).decode(),
                "image_size": "nope",
            },
            ["body", "image_size"],
            "value_error",
        ),
    ],
)
def test_invalid_image_input_is_422(api, path, body, loc, error_type):
    error = detail_of(api.client.post(path, json=body))
    assert error["loc"] == loc and error["type"] == error_type


def test_malformed_requests_are_4xx_not_500(api):
    assert detail_of(api.client.post("/fal-ai/flux/dev", content=b"{not json"))["type"] == "json_invalid"
    assert detail_of(api.client.post("/fal-ai/flux/dev", json=[1, 2]))["loc"] == ["body"]
    too_small = "data:image/png;base64," + base64.b64encode(png_bytes(20, 20)).decode()
    error = detail_of(
        api.client.post("/fal-ai/flux/dev/image-to-image", json={"prompt": "p", "image_url": too_small})
    )
    assert error["type"] == "image_too_small"
    unknown_app = api.client.post("/fal-ai/flux-pro/dev", json={"prompt": "p"})
    assert unknown_app.status_code == 404 and "fal-ai/flux-pro" in unknown_app.json()["detail"]
    unknown_endpoint = api.client.post("/fal-ai/flux/schnell", json={"prompt": "p"})
    assert unknown_endpoint.status_code == 404 and isinstance(unknown_endpoint.json()["detail"], str)
    bad_priority = api.client.post(
        "/fal-ai/flux/dev", json={"prompt": "p"}, headers={"X-Fal-Queue-Priority": "top"}
    )
    assert detail_of(bad_priority)["loc"] == ["header", "x-fal-queue-priority"]
    bad_timeout = api.client.post(
        "/fal-ai/flux/dev", json={"prompt": "p"}, headers={"X-Fal-Request-Timeout": "soon"}
    )
    assert detail_of(bad_timeout)["loc"] == ["header", "x-fal-request-timeout"]
    bad_webhook = api.client.post(
        "/fal-ai/flux/dev", params={"fal_webhook": "file:///etc/passwd"}, json={"prompt": "p"}
    )
    assert detail_of(bad_webhook)["loc"] == ["query", "fal_webhook"]
    assert api.worker.depth() == 0


def test_priority_header_orders_normal_before_low(api):
    low = api.submit(headers={"x-fal-queue-priority": "LOW"})["request_id"]
    normal = api.submit(headers={"X-Fal-Queue-Priority": "normal"})["request_id"]
    assert api.worker.get(low).job.priority == "low"
    assert api.client.get(f"/fal-ai/flux/requests/{low}/status").json()["queue_position"] == 1
    assert api.client.get(f"/fal-ai/flux/requests/{normal}/status").json()["queue_position"] == 0
    assert api.claim().id == normal
    api.complete(api.worker.get(normal))


def test_webhook_query_is_stored_on_the_job(api):
    request_id = api.submit(params={"fal_webhook": "https://hook.example/x?a=1"})["request_id"]
    webhook = api.worker.get(request_id).job.webhook
    assert webhook.url == "https://hook.example/x?a=1" and webhook.kind == "fal"


def test_request_timeout_header_fails_unstarted_jobs_with_504(api):
    before = time.time()
    request_id = api.submit(headers={"X-Fal-Request-Timeout": "0.2"})["request_id"]
    deadline = api.worker.get(request_id).job.start_deadline
    assert before + 0.2 <= deadline <= time.time() + 0.2
    # The API's background maintenance (every second) fails it once the deadline passes.
    for _ in range(50):
        status = api.client.get(f"/fal-ai/flux/requests/{request_id}/status").json()
        if status["status"] == "COMPLETED":
            break
        time.sleep(0.1)
    assert status["error_type"] == "request_timeout"
    result = api.client.get(f"/fal-ai/flux/requests/{request_id}")
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"
    assert result.headers["x-fal-error-type"] == "request_timeout"
    assert result.headers["x-fal-request-id"] == request_id


def read_events(response: httpx.Response, events: list, comments: list) -> None:
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
        elif line.startswith(":"):
            comments.append(line)
        else:
            assert line == "", f"unexpected SSE line {line!r}"


def test_status_stream_sends_one_event_per_change_and_closes(api):
    request_id = api.submit()["request_id"]
    events: list[dict] = []
    comments: list[str] = []
    headers: dict = {}

    def listen() -> None:
        with api.client.stream("GET", f"/fal-ai/flux/requests/{request_id}/status/stream?logs=1") as response:
            headers.update(response.headers)
            read_events(response, events, comments)

    listener = threading.Thread(target=listen)
    listener.start()
    wait_until(lambda: len(events) >= 1)
    record = api.claim(request_id)
    wait_until(lambda: len(events) >= 2)
    api.worker.log(request_id, "step 1/2", progress=0.5)
    wait_until(lambda: any(e["logs"] and e["logs"][-1]["message"] == "step 1/2" for e in events))
    api.complete(record)
    listener.join(10)
    assert not listener.is_alive(), "the stream did not close after COMPLETED"

    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-fal-request-id"] == request_id
    statuses = [event["status"] for event in events]
    assert statuses[0] == "IN_QUEUE" and events[0]["queue_position"] == 0
    assert statuses[-1] == "COMPLETED" and statuses.count("COMPLETED") == 1
    assert "IN_PROGRESS" in statuses
    assert events[-1]["metrics"] == {"inference_time": 0.25}
    # One event per change: no two consecutive events are identical.
    assert all(a != b for a, b in itertools.pairwise(events))


def test_status_stream_of_a_finished_request_sends_completed_and_closes(api):
    request_id = api.submit()["request_id"]
    api.complete(api.claim(request_id))
    response = api.client.get(f"/fal-ai/flux/requests/{request_id}/status/stream")
    lines = [line for line in response.text.splitlines() if line]
    assert len(lines) == 1 and json.loads(lines[0][len("data: ") :])["status"] == "COMPLETED"
    assert api.client.get("/fal-ai/flux/requests/nope/status/stream").status_code == 404


def test_record_status_enum_matches_wire_strings():
    assert {s.value for s in Status} == {"IN_QUEUE", "IN_PROGRESS", "COMPLETED"}


def test_oversized_bodies_are_refused(api):
    """The default limit: room for one input image, base64-encoded, plus 1 MiB."""
    limit = api.settings.max_input_image_bytes * 4 // 3 + 1024 * 1024
    assert api.settings.request_body_limit == limit
    response = api.client.post(
        "/fal-ai/flux/dev/redux",
        content=b'{"image_url": "data:image/png;base64,' + b"A" * limit + b'"}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413 and "larger than" in response.json()["detail"]
    assert api.worker.depth() == 0
