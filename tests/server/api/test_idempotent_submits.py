"""Idempotency-Key on every submit route, with the real clients: fal_client (queue and run),
raw HTTP for /stream and BFL, the openai SDK. A repeat answers the first request's id and
stores no job; the same key with another request is a 422 in the protocol's shape; a keyed
sync caller that hangs up leaves its job running for the retry. (The queue's side, tenants and
the window included, is tested on both backends in tests/server/queue/test_idempotency.py.)"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import fal_client
import fal_client.client
import httpx
import openai
import pytest

from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server
from tests.support import wait_until

APP = "fal-ai/flux/dev"


def new_key() -> str:
    return f"key-{uuid.uuid4()}"


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = target()
        except Exception as exc:  # surfaced by the test's assertions
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


@pytest.fixture
def fal(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{api.base_url}/")
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{api.base_url}/run/")
    return fal_client.SyncClient(key="any-key")


def test_fal_client_submits_with_one_key_make_one_job(api: ApiServer, fal: fal_client.SyncClient) -> None:
    key = new_key()
    first = fal.submit(APP, {"prompt": "a cat", "seed": 1}, headers={"Idempotency-Key": key})
    again = fal.submit(APP, {"prompt": "a cat", "seed": 1}, headers={"Idempotency-Key": key})
    other = fal.submit(APP, {"prompt": "a cat", "seed": 1}, headers={"Idempotency-Key": new_key()})
    plain = fal.submit(APP, {"prompt": "a cat", "seed": 1})
    assert again.request_id == first.request_id
    assert len({first.request_id, other.request_id, plain.request_id}) == 3
    assert api.worker.depth() == 3  # the repeat stored nothing

    record = api.claim(first.request_id)
    api.complete(record)
    # Still the same request after it completed: the client gets its result.
    late = fal.submit(APP, {"prompt": "a cat", "seed": 1}, headers={"Idempotency-Key": key})
    assert late.request_id == first.request_id and late.get()["images"][0]["width"] == 1024


def test_the_same_key_with_another_request_is_a_fal_422(api: ApiServer, fal: fal_client.SyncClient) -> None:
    key = new_key()
    fal.submit(APP, {"prompt": "a cat"}, headers={"Idempotency-Key": key})
    for path, body, headers in (
        (f"/{APP}", {"prompt": "a dog"}, {}),  # another body
        ("/fal-ai/flux-1/dev", {"prompt": "a cat"}, {}),  # another app
        (f"/{APP}", {"prompt": "a cat"}, {"x-fal-queue-priority": "low"}),  # another priority
        (f"/{APP}?fal_webhook=http://127.0.0.1:9/hook", {"prompt": "a cat"}, {}),  # another query
    ):
        response = api.client.post(path, json=body, headers={"Idempotency-Key": key, **headers})
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["header", "idempotency-key"] and error["type"] == "idempotency_key_reused"
    with pytest.raises(fal_client.client.FalClientHTTPError) as raised:  # not retried: a 422
        fal.submit(APP, {"prompt": "a dog"}, headers={"Idempotency-Key": key})
    assert raised.value.status_code == 422 and "different request" in str(raised.value.message)
    assert api.worker.depth() == 1


def test_an_empty_or_overlong_key_is_a_422(api: ApiServer) -> None:
    for key in ("", "k" * 256):
        response = api.client.post(f"/{APP}", json={"prompt": "p"}, headers={"Idempotency-Key": key})
        assert response.status_code == 422
        assert response.json()["detail"][0]["type"] == "idempotency_key_invalid"
    assert api.worker.depth() == 0


def test_sync_runs_with_one_key_wait_on_one_job(api: ApiServer, fal: fal_client.SyncClient) -> None:
    key = new_key()
    run = lambda: fal.run(APP, {"prompt": "sync", "seed": 3}, headers={"Idempotency-Key": key})  # noqa: E731
    first, first_box = in_thread(run)
    record = api.claim()
    second, second_box = in_thread(run)
    wait_until(lambda: second.is_alive(), what="the repeat waiting")
    api.complete(record)
    first.join(10)
    second.join(10)
    assert first_box["value"] == second_box["value"] and first_box["value"]["seed"] == 3
    assert api.worker.claim("test-worker", timeout=0) is None  # no second job


def test_a_keyed_run_survives_its_caller_hanging_up_and_the_retry_gets_it(api: ApiServer) -> None:
    key = new_key()
    with pytest.raises(httpx.ReadTimeout):
        api.client.post("/run/" + APP, json={"prompt": "p"}, headers={"Idempotency-Key": key}, timeout=0.5)
    record = api.claim()  # still there, not cancelled
    assert not api.worker.is_cancel_requested(record.id)
    thread, box = in_thread(
        lambda: api.client.post("/run/" + APP, json={"prompt": "p"}, headers={"Idempotency-Key": key})
    )
    api.complete(record)
    thread.join(10)
    assert box["value"].status_code == 200 and box["value"].headers["x-fal-request-id"] == record.id


def test_a_repeated_stream_streams_the_first_job(api: ApiServer) -> None:
    key = new_key()

    def stream() -> list[dict]:
        with api.client.stream(
            "POST", f"/run/{APP}/stream", json={"prompt": "s"}, headers={"Idempotency-Key": key}
        ) as response:
            assert response.status_code == 200
            return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]

    first, first_box = in_thread(stream)
    record = api.claim()
    second, second_box = in_thread(stream)
    wait_until(lambda: second.is_alive(), what="the repeat streaming")
    api.complete(record)
    first.join(10)
    second.join(10)
    for box in (first_box, second_box):
        events = box["value"]
        assert events[-1]["images"][0]["width"] == 1024
        assert all(e.get("request_id", record.id) == record.id for e in events[:-1])


def test_bfl_submits_with_one_key(api: ApiServer) -> None:
    key = new_key()
    body = {"prompt": "a fox", "width": 512, "height": 512, "seed": 4}
    first = api.client.post("/v1/flux-dev", json=body, headers={"Idempotency-Key": key})
    again = api.client.post("/v1/flux-dev", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and api.worker.depth() == 1
    other = api.client.post("/v1/flux-dev", json={**body, "seed": 5}, headers={"Idempotency-Key": key})
    assert other.status_code == 422
    (error,) = other.json()["detail"]  # BFL's shape: loc, msg, type
    assert error["loc"] == ["header", "idempotency-key"] and error["type"] == "idempotency_key_reused"


def test_openai_sdk_generations_and_edits_with_one_key(api: ApiServer) -> None:
    client = openai.OpenAI(base_url=f"{api.base_url}/v1", api_key="any", max_retries=0)
    key = new_key()

    def generate(prompt: str = "a fox") -> Any:
        return client.images.generate(
            prompt=prompt, size="256x256", response_format="url", extra_headers={"Idempotency-Key": key}
        )

    first, first_box = in_thread(generate)
    record = api.claim()
    second, second_box = in_thread(generate)
    wait_until(lambda: second.is_alive(), what="the repeat waiting")
    api.complete(record)
    first.join(10)
    second.join(10)
    assert first_box["value"].data[0].url == second_box["value"].data[0].url
    assert api.worker.claim("test-worker", timeout=0) is None
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        generate("a dog")
    assert raised.value.status_code == 422 and "Idempotency-Key" in raised.value.message

    # Multipart: each try has a new boundary, and is still the same request.
    edit_key = new_key()
    image = png_bytes(64, 64)
    edits = [
        in_thread(
            lambda: client.images.edit(
                image=("in.png", image, "image/png"),
                prompt="paint it",
                response_format="url",
                extra_headers={"Idempotency-Key": edit_key},
            )
        )
        for _ in range(2)
    ]
    record = api.claim()
    api.complete(record)
    for thread, box in edits:
        thread.join(10)
        assert "error" not in box, box.get("error")
    assert edits[0][1]["value"].data[0].url == edits[1][1]["value"].data[0].url
    assert api.worker.claim("test-worker", timeout=0) is None


def test_a_key_past_the_window_makes_a_new_job(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = api_settings(tmp_path_factory.mktemp("window"), idempotency_window_seconds=0.5)
    with run_api_server(settings) as server:
        key = {"Idempotency-Key": new_key()}
        first = server.submit(f"/{APP}", {"prompt": "p"}, headers=key)["request_id"]
        assert server.submit(f"/{APP}", {"prompt": "p"}, headers=key)["request_id"] == first
        time.sleep(0.6)
        # Past the window the key is new again, also for another request.
        later = server.submit(f"/{APP}", {"prompt": "another"}, headers=key)["request_id"]
        assert later != first and server.worker.depth() == 2
