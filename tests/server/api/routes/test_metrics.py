"""`/metrics` on a real API over HTTP: the queue's figures at scrape time, and who may read it."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import api_settings, run_api_server
from tests.support import wait_until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_queue_figures_follow_the_queue(api):
    for body in ({"prompt": "a"}, {"prompt": "b"}):
        api.submit(body=body)
    api.submit(body={"prompt": "c"}, headers={"x-fal-queue-priority": "low"})
    running = api.claim()
    response = api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    figures = samples(response.text)
    assert figures[("fluxserver_queue_size", (("priority", "normal"),))] == 1
    assert figures[("fluxserver_queue_size", (("priority", "low"),))] == 1
    assert figures[("fluxserver_requests_running", ())] == 1
    api.complete(running)
    figures = samples(api.client.get("/metrics").text)
    assert figures[("fluxserver_requests_running", ())] == 0
    assert figures[("fluxserver_workers", (("state", "ready"),))] == 0  # the test plays no registered worker


def test_a_queued_cancel_is_counted_by_endpoint_and_outcome(api):
    key = ("fluxserver_requests_total", (("endpoint", "fal-ai/flux/dev"), ("outcome", "request_cancelled")))
    before = samples(api.client.get("/metrics").text).get(key, 0.0)
    request_id = api.submit()["request_id"]
    assert api.client.put(f"/fal-ai/flux/requests/{request_id}/cancel").status_code == 202
    assert samples(api.client.get("/metrics").text)[key] == before + 1


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    settings = api_settings(tmp_path_factory.mktemp("metrics-auth"), api_key=["api-secret"])
    with run_api_server(settings) as server:
        yield server


@pytest.fixture(scope="module")
def metrics_key_server(tmp_path_factory):
    settings = api_settings(
        tmp_path_factory.mktemp("metrics-key"), api_key=["api-secret"], metrics_key="scrape-only"
    )
    with run_api_server(settings) as server:
        yield server


def test_metrics_need_an_api_key_when_auth_is_on(secured):
    assert secured.client.get("/metrics").status_code == 401
    assert secured.client.get("/metrics", headers={"Authorization": "Key wrong"}).status_code == 401
    assert secured.client.get("/metrics", headers={"Authorization": "Key api-secret"}).status_code == 200


def test_a_metrics_key_replaces_the_api_keys_on_metrics_only(metrics_key_server):
    client = metrics_key_server.client
    assert client.get("/metrics", headers={"Authorization": "Bearer scrape-only"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Key api-secret"}).status_code == 401
    # The metrics key generates nothing.
    submit = client.post(
        "/fal-ai/flux/dev", json={"prompt": "p"}, headers={"Authorization": "Key scrape-only"}
    )
    assert submit.status_code == 401


def test_requests_failed_by_the_queue_upkeep_are_counted(api):
    """A start deadline that passes while queued: failed by the API's upkeep, not a worker."""
    key = ("fluxserver_requests_total", (("endpoint", "fal-ai/flux/dev"), ("outcome", "request_timeout")))
    before = samples(api.client.get("/metrics").text).get(key, 0.0)
    request_id = api.submit(headers={"x-fal-request-timeout": "0.5"})["request_id"]
    wait_until(
        lambda: (r := api.worker.get(request_id)) is not None and r.error is not None, 30, "the timeout"
    )
    wait_until(lambda: samples(api.client.get("/metrics").text).get(key, 0.0) == before + 1, 30, "the count")
