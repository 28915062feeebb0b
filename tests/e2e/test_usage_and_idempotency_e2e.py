"""A real `flux-server serve` (API and worker processes, the tiny model): the real fal_client
submitting twice with one Idempotency-Key makes one job, and the usage the worker's
completion adds (pixels exact, GPU seconds its inference time) shows on /admin/usage and
/metrics."""

from __future__ import annotations

import time
import uuid

import pytest
from e2e_support import DEV, run_node_script, small_input
from prometheus_client.parser import text_string_to_metric_families

from server.queue.usage import utc_day


def usage_row(client, day: str) -> dict:
    rows = client.get("/admin/usage", params={"from": day, "to": day}).json()["rows"]
    found = [row for row in rows if (row["tenant"], row["endpoint"]) == ("default", "fal-ai/flux")]
    return found[0] if found else {"requests": 0, "images": 0, "pixels": 0, "gpu_seconds": 0.0}


def tenant_images(client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "fluxserver_tenant_images_total" and sample.labels == {
                "tenant": "default",
                "endpoint": "fal-ai/flux",
            }:
                return sample.value
    return 0.0


def test_a_repeated_submit_is_one_job_and_its_usage_is_counted_once(flux_server, fal) -> None:
    day = utc_day(time.time())
    key = {"Idempotency-Key": f"e2e-{uuid.uuid4()}"}
    arguments = small_input(seed=31, image_size={"width": 96, "height": 64})
    with flux_server.client() as client:
        before, images_before = usage_row(client, day), tenant_images(client)
        first = fal.sync.submit(DEV, arguments, headers=key)
        again = fal.sync.submit(DEV, arguments, headers=key)
        assert again.request_id == first.request_id
        output = first.get()
        assert fal.sync.submit(DEV, arguments, headers=key).request_id == first.request_id
        after, images_after = usage_row(client, day), tenant_images(client)
    assert after["requests"] - before["requests"] == 1  # one job for three submits
    assert after["images"] - before["images"] == 1 and images_after - images_before == 1
    assert after["pixels"] - before["pixels"] == 96 * 64
    assert after["gpu_seconds"] - before["gpu_seconds"] == pytest.approx(output["timings"]["inference"])


def test_the_js_client_sends_the_key_in_both_modes(flux_server) -> None:
    seen = run_node_script(flux_server, "idempotency.mjs", KEY_PREFIX=f"js-{uuid.uuid4()}")
    for mode in ("proxy", "middleware"):
        run = seen[mode]
        assert run["again"] == run["first"], mode
        refused = run["refused"]
        assert refused["thrown"] and refused["isApiError"] and refused["status"] == 422, (mode, refused)
        assert refused["body"]["detail"][0]["type"] == "idempotency_key_reused"
    assert seen["proxy"]["first"] != seen["middleware"]["first"]  # two keys, two jobs
