"""`/health/live`, `/health/ready` and `/health` on a real API over HTTP, the workers played by
the test's own queue handle (their registry rows, as real workers write them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg_server import PostgresServer, remove, start_postgres
from tests.server.conftest import ApiServer, api_settings, run_api_server
from tests.support import error_body, wait_until


def ready(api: ApiServer, *worker_ids: str) -> None:
    for worker_id in worker_ids:
        api.worker.set_worker_state(worker_id, "ready", device="cpu", model="tiny")


def test_nothing_is_ready_until_a_worker_is_but_the_api_is_alive(tmp_path: Path) -> None:
    with run_api_server(api_settings(tmp_path, safety_checker=tmp_path / "checker")) as api:
        assert api.client.get("/health/live").json() == {"status": "alive"}
        response = api.client.get("/health")
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["reason"] == "no worker has registered yet"
        assert body["workers"] == [] and body["queue_depth"] == 0 and body["model"] == "tiny"
        assert body["safety_checker"] == "configured"
        ready_answer = api.client.get("/health/ready")
        assert ready_answer.status_code == 503
        assert error_body(ready_answer) == {
            "status": "unavailable",
            "workers_ready": 0,
            "workers_needed": 1,
            "workers_expected": 1,
            "reasons": ["no worker has registered yet"],
        }

        api.worker.set_worker_state("w0", "loading", device="cpu", model="tiny", detail="reading weights")
        api.submit()
        response = api.client.get("/health")
        assert response.status_code == 503
        assert "worker w0 is loading: reading weights" in response.json()["reason"]
        assert response.json()["queue_depth"] == 1

        ready(api, "w0")
        response = api.client.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok" and "reason" not in body and "reasons" not in body
        assert {w["id"]: w["state"] for w in body["workers"]} == {"w0": "ready"}
        assert set(body["workers"][0]) == {"id", "state", "device", "model", "detail"}
        assert api.client.get("/health/ready").json()["status"] == "ok"


def test_one_failed_gpu_of_eight_is_degraded_not_down(tmp_path: Path) -> None:
    # `serve` on eight GPUs passes FLUX_WORKERS=8.
    with run_api_server(api_settings(tmp_path, workers=8)) as api:
        ready(api, *(f"w{i}" for i in range(7)))
        api.worker.set_worker_state(
            "w7",
            "failed",
            device="cuda:7",
            model="tiny",
            detail="OutOfMemoryError: CUDA out of memory; next try at 03:12:00 UTC",
        )
        response = api.client.get("/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "degraded"
        assert body["reasons"] == [
            "7 of 8 workers ready",
            "worker w7 is failed: OutOfMemoryError: CUDA out of memory; next try at 03:12:00 UTC",
        ]
        assert body["reason"] == "; ".join(body["reasons"])
        answer = api.client.get("/health/ready")
        assert answer.status_code == 200
        assert answer.json()["status"] == "degraded" and answer.json()["workers_ready"] == 7

        ready(api, "w7")
        assert api.client.get("/health").json()["status"] == "ok"


def test_a_worker_serve_started_but_that_never_registered_makes_the_box_degraded(tmp_path: Path) -> None:
    with run_api_server(api_settings(tmp_path, workers=2)) as api:
        ready(api, "w0")
        response = api.client.get("/health")
        assert response.status_code == 200
        assert response.json()["status"] == "degraded"
        assert response.json()["reason"] == "1 of 2 workers ready"
        ready(api, "w1")
        assert api.client.get("/health").json()["status"] == "ok"


def test_min_ready_workers_sets_how_many_it_takes(tmp_path: Path) -> None:
    with run_api_server(api_settings(tmp_path, workers=4, min_ready_workers=3)) as api:
        ready(api, "w0", "w1")
        answer = api.client.get("/health/ready")
        assert answer.status_code == 503
        assert answer.json()["workers_needed"] == 3 and answer.json()["status"] == "unavailable"
        assert api.client.get("/health").status_code == 503
        ready(api, "w2")
        assert api.client.get("/health/ready").status_code == 200
        assert api.client.get("/health").json()["status"] == "degraded"

    # More than the box runs: all of them, not an answer that never comes.
    with run_api_server(api_settings(tmp_path / "one", workers=1, min_ready_workers=3)) as api:
        ready(api, "w0")
        answer = api.client.get("/health/ready")
        assert answer.status_code == 200 and answer.json()["workers_needed"] == 1


def test_a_ready_worker_without_heartbeats_is_stale(tmp_path: Path) -> None:
    # lease_seconds=1: a worker that did not refresh its row for a second is not alive.
    with run_api_server(api_settings(tmp_path, lease_seconds=1.0)) as api:
        ready(api, "w0")
        stale = wait_until(
            lambda: (r := api.client.get("/health/ready")).status_code == 503 and r.json(),
            30,
            "w0 to go stale",
        )
        summary, reason = stale["reasons"]
        assert summary == "0 of 1 workers ready"
        assert reason.startswith("worker w0 is stale: no heartbeat for ") and reason.endswith(" s")
        body = api.client.get("/health").json()
        assert body["status"] == "unavailable" and body["workers"][0]["state"] == "ready"
        ready(api, "w0")  # its heartbeat
        assert api.client.get("/health/ready").status_code == 200


def test_an_api_only_box_is_ready_once_its_queue_answers(tmp_path: Path) -> None:
    with run_api_server(api_settings(tmp_path, role="api")) as api:
        answer = api.client.get("/health/ready")
        assert answer.status_code == 200
        assert answer.json()["status"] == "degraded"
        assert answer.json()["reasons"] == ["no worker of any box is ready yet"]
        response = api.client.get("/health")
        assert response.status_code == 200 and response.json()["role"] == "api"
        ready(api, "gpu-box-w0")
        assert api.client.get("/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path_factory.mktemp("postgres-for-health"))
    yield server
    remove(server)


def test_liveness_touches_no_database(tmp_path: Path, own_postgres: PostgresServer) -> None:
    settings = api_settings(tmp_path, queue_url=own_postgres.fresh_database_url(), role="api")
    with run_api_server(settings) as api:
        assert api.client.get("/health/ready").status_code == 200
        own_postgres.stop()
        try:
            assert api.client.get("/health/live").status_code == 200
            not_ready = api.client.get("/health/ready")
            assert not_ready.status_code == 503 and "unavailable" in not_ready.json()["detail"]
            assert api.client.get("/health").status_code == 503
        finally:
            own_postgres.start()
        wait_until(
            lambda: api.client.get("/health/ready").status_code == 200, 30, "the queue to answer again"
        )


def test_each_worker_shows_the_variants_it_holds(tmp_path: Path) -> None:
    with run_api_server(api_settings(tmp_path, workers=2)) as api:
        detail = (
            "tiny; memory plan resident; variants [device: dev (pinned), fill; host: kontext; disk: krea]"
        )
        api.worker.set_worker_state("w0", "ready", device="cuda:0", model="tiny", detail=detail)
        ready(api, "w1")  # the base alone: no variants entry
        workers = {w["id"]: w for w in api.client.get("/health").json()["workers"]}
        assert workers["w0"]["variants"] == {
            "device": ["dev (pinned)", "fill"],
            "host": ["kontext"],
            "disk": ["krea"],
        }
        assert "variants" not in workers["w1"]
