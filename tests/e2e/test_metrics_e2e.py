"""`/metrics` of a real `flux-server serve` (API and worker processes): the figures every
process records add up in one scrape, and move with real requests."""

from __future__ import annotations

from e2e_support import DEV, small_input, submit, wait_completed
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    found: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def by_endpoint(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({"endpoint": DEV, **labels}.items()))


def test_worker_and_api_figures_add_up_after_real_requests(flux_server) -> None:
    with flux_server.client() as client:
        before = scrape(client)
        ids = [submit(client, DEV, small_input(seed=seed))["request_id"] for seed in (11, 12)]
        for request_id in ids:
            wait_completed(client, request_id)
        after = scrape(client)

    def grew(key: tuple[str, tuple[tuple[str, str], ...]]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    # Recorded by the worker process, read by the API process.
    assert grew(by_endpoint("fluxserver_requests_total", outcome="success")) == 2
    assert grew(by_endpoint("fluxserver_images_generated_total")) == 2
    for histogram in ("inference_seconds", "request_duration_seconds", "queue_wait_seconds"):
        assert grew(by_endpoint(f"fluxserver_{histogram}_count")) == 2, histogram
    assert grew(by_endpoint("fluxserver_inference_seconds_sum")) > 0
    assert grew(by_endpoint("fluxserver_denoising_step_seconds_count")) == 2
    # End-to-end time includes the inference time.
    assert grew(by_endpoint("fluxserver_request_duration_seconds_sum")) >= grew(
        by_endpoint("fluxserver_inference_seconds_sum")
    )
    # Read from the queue at scrape time.
    assert after[("fluxserver_workers", (("state", "ready"),))] == 1
    assert after[("fluxserver_requests_running", ())] == 0
    assert ("fluxserver_queue_size", (("priority", "normal"),)) in after
    # A CPU worker has no GPU memory to report.
    assert not any(name.startswith("fluxserver_gpu_memory") for name, _ in after)
