"""The real Python fal_client (1.0.3) against `flux-server serve --model tiny` over HTTPS.

Configured the way a user does it: FAL_QUEUE_RUN_HOST, FAL_RUN_HOST, SSL_CERT_FILE, FAL_KEY.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
from e2e_support import (
    APP,
    DEV,
    PROMPT,
    blocking_job,
    cancel,
    check_output,
    sample_image_data_uri,
    small_input,
    status,
    submit,
    wait_completed,
)

from tests.support import png_header_only

pytestmark = pytest.mark.timeout(180)


def test_environment_alone_points_a_fresh_fal_client_at_the_server(flux_server, fal) -> None:
    script = textwrap.dedent(
        """
        import json, fal_client
        out = fal_client.subscribe("fal-ai/flux/dev", {"prompt": "a red chair",
            "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2})
        print(json.dumps(out))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAL_")}
    env.update(fal.env)
    argv = [sys.executable, "-c", script]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    output = json.loads(proc.stdout.strip().splitlines()[-1])
    assert output["prompt"] == "a red chair"
    assert output["images"][0]["url"].startswith(flux_server.base_url + "/files/")
    with flux_server.client() as client:
        check_output(client, output)


def test_subscribe_reports_queued_in_progress_with_step_logs_and_completed(flux_server, fal) -> None:
    updates: list[object] = []
    with flux_server.client() as client, blocking_job(client) as blocker:

        def on_update(update: object) -> None:
            updates.append(update)
            first_queued = sum(isinstance(u, fal.module.Queued) for u in updates) == 1
            if isinstance(update, fal.module.Queued) and first_queued:
                cancel(client, blocker)  # let ours run now that it was seen waiting

        enqueued: list[str] = []
        output = fal.sync.subscribe(
            DEV,
            small_input(num_inference_steps=4),
            with_logs=True,
            on_enqueue=enqueued.append,
            on_queue_update=on_update,
        )
        check_output(client, output)
    kinds = [type(u).__name__ for u in updates]
    assert kinds[0] == "Queued" and updates[0].position == 0
    assert "InProgress" in kinds or "Completed" in kinds
    assert kinds[-1] == "Completed" and kinds.count("Completed") == 1
    assert len(enqueued) == 1
    final = updates[-1]
    messages = [entry["message"] for entry in final.logs]
    for i in range(1, 5):
        assert any(f"step {i}/4" in m for m in messages), messages
    assert all(entry["timestamp"] for entry in final.logs)
    assert final.error is None and final.metrics["inference_time"] > 0


def test_submit_then_status_result_and_cancel_by_id(flux_server, fal) -> None:
    handle = fal.sync.submit(DEV, small_input(seed=1234))
    request_id = handle.request_id
    assert handle.status_url == f"{flux_server.base_url}/{APP}/requests/{request_id}/status"
    first = fal.sync.status(DEV, request_id, with_logs=True)
    assert isinstance(first, fal.module.Queued | fal.module.InProgress | fal.module.Completed)
    output = fal.sync.result(DEV, request_id)  # polls status by id, then GETs the result
    assert output["seed"] == 1234 and output["prompt"] == PROMPT
    done = fal.sync.status(DEV, request_id, with_logs=False)
    assert isinstance(done, fal.module.Completed) and done.error is None
    with pytest.raises(fal.module.FalClientHTTPError) as caught:
        fal.sync.cancel(DEV, request_id)
    assert caught.value.status_code == 400
    assert "ALREADY_COMPLETED" in caught.value.message
    with flux_server.client() as client:
        check_output(client, output)


def test_run_returns_the_output_in_png_and_jpeg(flux_server, fal) -> None:
    with flux_server.client() as client:
        png = fal.sync.run(DEV, small_input(output_format="png", seed=5))
        assert check_output(client, png).format == "PNG"
        assert png["seed"] == 5
        jpeg = fal.sync.run("fal-ai/flux-1/dev", small_input(seed=5))
        assert check_output(client, jpeg).format == "JPEG"


def test_acceleration_reports_the_preset_that_ran(flux_server, fal) -> None:
    # A CPU server enables only `none` (compiling the others takes minutes on a CPU): asking
    # for `high` runs `none`, and the output and the logs say so.
    handle = fal.sync.submit(DEV, small_input(acceleration="high", seed=11))
    output = handle.get()
    assert output["acceleration"] == "none"
    assert "'high' is not enabled" in output["acceleration_note"]
    logs = [entry["message"] for entry in handle.status(with_logs=True).logs]
    assert any("(preset none: preset 'high' is not enabled" in message for message in logs), logs
    assert fal.sync.run(DEV, small_input(acceleration="none"))["acceleration"] == "none"


def test_sync_mode_returns_data_uris(flux_server, fal) -> None:
    output = fal.sync.run(DEV, small_input(sync_mode=True, output_format="png"))
    url = output["images"][0]["url"]
    assert url.startswith("data:image/png;base64,")


def test_stream_ends_with_the_full_output(flux_server, fal) -> None:
    events = list(fal.sync.stream(DEV, small_input(num_inference_steps=3, seed=99)))
    assert len(events) >= 1
    final = events[-1]
    assert final["seed"] == 99
    with flux_server.client() as client:
        check_output(client, final)


def test_image_to_image_with_a_data_uri_input(flux_server, fal) -> None:
    body = {
        "prompt": "the same picture at dusk",
        "image_url": sample_image_data_uri((96, 64)),
        "strength": 0.3,
        "num_inference_steps": 10,  # fal's minimum here; strength 0.3 runs 3 of them
        "seed": 3,
    }
    logs: list[str] = []
    output = fal.sync.subscribe(
        "fal-ai/flux/dev/image-to-image",
        body,
        with_logs=True,
        on_queue_update=lambda u: logs.extend(e["message"] for e in (getattr(u, "logs", None) or [])),
    )
    with flux_server.client() as client:
        check_output(client, output, size=(96, 64))  # the output follows the input's size
    assert any("step 3/3" in m for m in logs), logs


def test_image_to_image_inputs_are_bounded_at_submit(flux_server, fal) -> None:
    """An input larger than the output is shrunk at submit and the job completes on the real
    worker; one whose header claims too many pixels is refused as fal does, before decoding."""
    body = {"prompt": "p", "image_url": sample_image_data_uri((100, 70)), "strength": 0.2}
    output = fal.sync.subscribe("fal-ai/flux/dev/image-to-image", {**body, "num_inference_steps": 10})
    with flux_server.client() as client:
        check_output(client, output, size=(96, 64))

    huge = "data:image/png;base64," + base64.b64encode(png_header_only(30000, 30000)).decode()
    with pytest.raises(fal.module.FalClientHTTPError) as caught:
        fal.sync.submit("fal-ai/flux/dev/image-to-image", {**body, "image_url": huge})
    assert caught.value.status_code == 422
    [error] = caught.value.message
    assert error["loc"] == ["body", "image_url"] and error["type"] == "image_too_large"


@pytest.mark.parametrize("endpoint", ["fal-ai/flux-1/dev/redux", "fal-ai/flux/dev/redux"])
def test_redux(flux_server, fal, endpoint: str) -> None:
    body = {
        "image_url": sample_image_data_uri(),
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 2,
        "seed": 11,
    }
    output = fal.sync.subscribe(endpoint, body)
    assert output["seed"] == 11
    with flux_server.client() as client:
        check_output(client, output)


def test_async_client(flux_server, fal) -> None:
    async def scenario() -> tuple[dict, object, dict]:
        client = fal.module.AsyncClient()
        handle = await client.submit(DEV, small_input(seed=21))
        subscribed = await client.subscribe("fal-ai/flux-1/dev", small_input(seed=22), with_logs=True)
        by_id = await client.result(DEV, handle.request_id)
        last = await client.status(DEV, handle.request_id)
        return subscribed, last, by_id

    subscribed, last, by_id = asyncio.run(scenario())
    assert subscribed["seed"] == 22 and by_id["seed"] == 21
    assert isinstance(last, fal.module.Completed)
    with flux_server.client() as client:
        check_output(client, subscribed)
        check_output(client, by_id)


def test_validation_errors_surface_as_422_with_a_detail_list(flux_server, fal) -> None:
    with pytest.raises(fal.module.FalClientHTTPError) as caught:
        fal.sync.submit(DEV, small_input(num_images=5))
    error = caught.value
    assert error.status_code == 422
    assert isinstance(error.message, list) and error.message
    assert any("num_images" in item["loc"] for item in error.message), error.message

    with pytest.raises(fal.module.FalClientHTTPError) as missing:
        fal.sync.run(DEV, {"image_size": "square"})
    assert missing.value.status_code == 422
    assert any(item["loc"][-1] == "prompt" for item in missing.value.message)
    assert all({"loc", "msg", "type"} <= set(item) for item in missing.value.message)


def test_cancel_a_queued_and_a_running_request(flux_server, fal) -> None:
    with flux_server.client() as client:
        with blocking_job(client) as blocker:
            queued = fal.sync.submit(DEV, small_input())
            assert isinstance(fal.sync.status(DEV, queued.request_id), fal.module.Queued)
            fal.sync.cancel(DEV, queued.request_id)  # 202 CANCELLATION_REQUESTED: no exception
            done = fal.sync.status(DEV, queued.request_id)
            assert isinstance(done, fal.module.Completed)
            assert done.error_type == "request_cancelled"

            running = fal.sync.status(DEV, blocker, with_logs=True)
            assert isinstance(running, fal.module.InProgress)
            response = cancel(client, blocker)
            assert response.status_code == 202
            assert response.json()["status"] == "CANCELLATION_REQUESTED"
            stopped = wait_completed(client, blocker, timeout=30)
            assert stopped["error_type"] == "request_cancelled"
        with pytest.raises(fal.module.FalClientHTTPError) as caught:
            fal.sync.result(DEV, queued.request_id)
        assert caught.value.status_code >= 400 and caught.value.status_code not in (408, 409, 429)


# --------------------------------------------------------------------------- queue behaviour


def test_queue_positions_count_the_jobs_ahead(flux_server, fal) -> None:
    with flux_server.client() as client, blocking_job(client):
        ids = [fal.sync.submit(DEV, small_input(seed=i)).request_id for i in range(4)]
        positions = [fal.sync.status(DEV, rid).position for rid in ids]
        assert positions == [0, 1, 2, 3]
        assert flux_server.health().json()["queue_depth"] == 4
        for rid in ids[:2]:
            cancel(client, rid)
        assert [fal.sync.status(DEV, rid).position for rid in ids[2:]] == [0, 1]
        for rid in ids[2:]:
            cancel(client, rid)


def test_low_priority_waits_behind_normal(flux_server, fal) -> None:
    with flux_server.client() as client:
        with blocking_job(client):
            low = fal.sync.submit(DEV, small_input(seed=1), priority="low").request_id
            normal = [fal.sync.submit(DEV, small_input(seed=s)).request_id for s in (2, 3)]
            assert [fal.sync.status(DEV, rid).position for rid in (*normal, low)] == [0, 1, 2]
        started = {}
        for rid in (low, *normal):
            body = wait_completed(client, rid)
            assert body.get("error") is None
            started[rid] = min(e["timestamp"] for e in body["logs"] if "step" in e["message"])
        assert started[normal[0]] < started[normal[1]] < started[low]


def test_start_timeout_expires_a_waiting_request(flux_server, fal) -> None:
    with flux_server.client() as client:
        with blocking_job(client):
            handle = fal.sync.submit(DEV, small_input(), start_timeout=2)
            began = time.monotonic()
            done = wait_completed(client, handle.request_id, timeout=20)
            assert time.monotonic() - began < 10
            assert done["error_type"] == "request_timeout"
            with pytest.raises(fal.module.FalClientHTTPError) as caught:
                fal.sync.result(DEV, handle.request_id)
        error = caught.value
        assert error.status_code == 504
        assert error.response_headers.get("x-fal-request-timeout-type") == "user"
        raw = client.get(f"/{APP}/requests/{handle.request_id}")
        assert raw.status_code == 504 and raw.headers["x-fal-request-timeout-type"] == "user"


def test_status_stream_over_https(flux_server) -> None:
    with flux_server.client() as client:
        rid = submit(client, DEV, small_input())["request_id"]
        events = []
        with client.stream("GET", f"/{APP}/requests/{rid}/status/stream", params={"logs": 1}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        assert events[-1]["status"] == "COMPLETED"
        assert status(client, rid)["status"] == "COMPLETED"


def test_unknown_request_is_404(flux_server, fal) -> None:
    with pytest.raises(fal.module.FalClientHTTPError) as caught:
        fal.sync.status(DEV, "00000000-0000-0000-0000-000000000000")
    assert caught.value.status_code == 404
    with httpx.Client(verify=flux_server.verify) as client:
        response = client.get(f"{flux_server.base_url}/{APP}/requests/nope")
        assert response.status_code == 404
