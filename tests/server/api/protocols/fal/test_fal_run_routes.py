"""fal's sync run and /stream over real HTTP: a waiting submitter on the same queue."""

from __future__ import annotations

import json
import sqlite3
import threading

import httpx

from server.jobs import JobError
from tests.support import error_body, wait_until


def in_thread(target) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = target()
        except Exception as exc:  # surfaced by the test's assertions
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_sync_run_returns_the_output(api):
    thread, box = in_thread(
        lambda: api.client.post("/run/fal-ai/flux/dev", json={"prompt": "sync", "image_size": "square"})
    )
    record = api.claim()
    assert record.job.prompt == "sync" and record.job.protocol == "fal" and record.job.endpoint == "dev"
    api.worker.log(record.id, "step 1/1", progress=1.0)
    api.complete(record)
    thread.join(10)
    response = box["value"]
    assert response.status_code == 200
    assert response.headers["x-fal-request-id"] == record.id
    output = response.json()
    assert output["prompt"] == "sync" and output["images"][0]["width"] == 512
    assert output["images"][0]["url"].startswith(api.base_url + "/files/")


def test_sync_run_failure_returns_the_error(api):
    thread, box = in_thread(
        lambda: api.client.post("/run/fal-ai/flux-1/dev/image-to-image/", json={"prompt": "p"})
    )
    thread.join(10)
    assert box["value"].status_code == 422  # validated before anything is queued
    thread, box = in_thread(lambda: api.client.post("/run/fal-ai/flux-1/dev", json={"prompt": "p"}))
    record = api.claim()
    api.fail(record, JobError(message="boom", error_type="internal_server_error"))
    thread.join(10)
    response = box["value"]
    assert response.status_code == 500
    assert error_body(response) == {"detail": "boom", "error_type": "internal_server_error"}
    assert response.headers["x-fal-error-type"] == "internal_server_error"
    assert response.headers["x-fal-request-id"] == record.id


def latest_request_id(api) -> str:
    with sqlite3.connect(api.settings.db_path) as conn:
        return conn.execute("SELECT id FROM jobs ORDER BY seq DESC LIMIT 1").fetchone()[0]


def test_sync_run_client_disconnect_cancels_the_job(api):
    with httpx.Client(base_url=api.base_url, timeout=0.5) as impatient:
        try:
            impatient.post("/run/fal-ai/flux/dev", json={"prompt": "nobody waits"})
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError("the run should still be waiting")
    request_id = latest_request_id(api)
    record = wait_until(
        lambda: (current := api.worker.get(request_id)).error is not None and current,
        30,
        "the abandoned job to be cancelled",
    )
    assert record.error.error_type == "request_cancelled"


def test_sync_stream_client_disconnect_cancels_the_job(api):
    """/stream is a sync request too: the caller that hangs up cancels its job, also while
    the job is running (the worker sees the cancel flag)."""
    with api.client.stream("POST", "/run/fal-ai/flux/dev/stream", json={"prompt": "gone"}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        request_id = json.loads(first[len("data: ") :])["request_id"]
        record = api.claim(request_id)
        api.worker.log(record.id, "step 1/2", progress=0.5)
        next(line for line in lines if line.startswith("data: "))  # the progress event
    wait_until(lambda: api.worker.is_cancel_requested(request_id), 30, "the cancel flag")


def stream_events(
    api, path: str, body: dict, events: list[dict] | None = None
) -> tuple[httpx.Response, list[dict]]:
    """Read the stream to its end; each event is appended to `events` as it arrives."""
    events = [] if events is None else events
    with api.client.stream("POST", path, json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
            else:
                assert line == "" or line.startswith(":"), line
    return response, events


def test_stream_sends_progress_then_the_output_last(api):
    seen: list[dict] = []
    path = "/run/fal-ai/flux/dev/stream"
    thread, box = in_thread(lambda: stream_events(api, path, {"prompt": "streamed"}, seen))
    record = api.claim()
    assert record.job.endpoint == "dev"
    for step in (1, 2):
        # The next change only once the stream has sent this one, so that every step shows.
        api.worker.log(record.id, f"step {step}/2", progress=step / 2)
        wait_until(lambda step=step: any(e.get("progress") == step / 2 for e in seen), 30, f"step {step}")
    api.complete(record)
    thread.join(10)
    response, events = box["value"]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-fal-request-id"] == record.id
    assert all(isinstance(event, dict) for event in events)
    assert events[0]["status"] in ("IN_QUEUE", "IN_PROGRESS")
    progress = [e for e in events[:-1] if e.get("status") == "IN_PROGRESS"]
    assert progress and progress[-1]["progress"] == 1.0
    messages = [entry["message"] for event in progress for entry in event["logs"]]
    assert "step 1/2" in messages and "step 2/2" in messages
    assert events[-1]["prompt"] == "streamed" and events[-1]["images"]


def test_stream_failure_ends_with_the_error_body(api):
    thread, box = in_thread(lambda: stream_events(api, "/run/fal-ai/flux/dev/stream", {"prompt": "p"}))
    api.fail(api.claim(), JobError(message="boom", error_type="internal_server_error"))
    thread.join(10)
    _, events = box["value"]
    assert events[-1] == {"detail": "boom", "error_type": "internal_server_error"}


def test_run_unknown_app_is_404(api):
    assert api.client.post("/run/fal-ai/nope/dev", json={"prompt": "p"}).status_code == 404
    assert api.client.post("/run/fal-ai/flux/dev/stream/extra", json={"prompt": "p"}).status_code == 404
