"""PostgreSQL away for longer than every patience window, as a managed database's failover
is: a `flux-server serve` box with two workers, one of them killed (and restarted by the
supervisor) while the database is down. When the database is back, every worker serves
again, nothing accepted is lost, and the job whose worker lived through the outage ran once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import DEV, check_output, small_input, submit, wait_completed, wait_running

from server.config import Settings
from server.queue.factory import open_queue
from tests.conftest import FluxServer, launch_server
from tests.pg_server import PostgresServer, remove, start_postgres
from tests.support import wait_until

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

LEASE_SECONDS = 6.0
# Longer than the lease, the queue pool's reconnect timeout (5 s) and the worker's longest
# backoff between two tries (15 s): every patience window runs out inside the outage.
OUTAGE_SECONDS = 25.0
LONG_INPUT = {
    "prompt": "a harbour at dawn",
    "image_size": {"width": 512, "height": 512},
    "num_inference_steps": 16,
}


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path / "postgres")
    yield server
    remove(server)


def started_on(queue, request_id: str) -> list[str]:
    """The workers that started a request, one entry per attempt ("Started on <worker>")."""
    record = queue.get(request_id)
    assert record is not None
    return [e.message.removeprefix("Started on ") for e in record.logs if e.message.startswith("Started on ")]


def test_database_outage_with_a_worker_restarted_inside_it(
    postgres: PostgresServer, tmp_path: Path, tiny_model_dir: Path, certs
) -> None:
    url = postgres.fresh_database_url()
    server: FluxServer = launch_server(
        tmp_path / "box",
        tiny_model_dir=tiny_model_dir,
        certs=certs,
        workers=2,
        args=["--queue-url", url, "--lease-seconds", str(LEASE_SECONDS), "--min-ready-workers", "2"],
    )
    observer = open_queue(Settings(data_dir=tmp_path / "observer", queue_url=url), role="test")
    try:
        with server.client() as client:
            # One long job per worker, so that one runs on a worker that lives through the
            # outage and one on the worker killed inside it.
            first = submit(client, DEV, {**LONG_INPUT, "seed": 1})["request_id"]
            wait_running(client, first)
            second = submit(client, DEV, {**LONG_INPUT, "seed": 2})["request_id"]
            wait_running(client, second)
            queued = [submit(client, DEV, small_input(seed=10 + i))["request_id"] for i in range(3)]
            survivor_job, killed_job = first, second
            survivor = started_on(observer, survivor_job)[0]
            victim = started_on(observer, killed_job)[0]
            assert survivor != victim

            postgres.stop()
            down_since = time.monotonic()
            killed_pid = server.worker_pid(victim)
            os.kill(killed_pid, signal.SIGKILL)
            wait_until(
                lambda: server.worker_pid(victim) != killed_pid, 60, "the supervisor to restart the worker"
            )
            assert server.process.poll() is None
            # The restarted worker comes up while the database is still away.
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_since)))  # the outage itself
            live = server.client(timeout=5.0).get("/health/live")
            assert live.status_code == 200  # the box is alive: nothing to restart
            postgres.start()

            wait_until(
                lambda: server.client(timeout=5.0).get("/health/ready").status_code == 200,
                180,
                "both workers ready again",
            )
            for request_id, size in [
                (first, (512, 512)),
                (second, (512, 512)),
                *((q, (64, 64)) for q in queued),
            ]:
                done = wait_completed(client, request_id, timeout=180)
                assert done.get("error") is None, done
                check_output(client, client.get(f"/fal-ai/flux/requests/{request_id}").json(), size=size)
            # The survivor's job ran once, on its first attempt; the killed worker's job was
            # retried after the outage.
            assert started_on(observer, survivor_job) == [survivor]
            assert observer.get(survivor_job).attempts == 1
            assert len(started_on(observer, killed_job)) == 2
            # Both workers take new work.
            after = [submit(client, DEV, small_input(seed=20 + i))["request_id"] for i in range(4)]
            for request_id in after:
                assert wait_completed(client, request_id, timeout=120).get("error") is None
            health = client.get("/health").json()
            assert health["status"] == "ok", health
            assert sorted(w["state"] for w in health["workers"]) == ["ready", "ready"]
    finally:
        observer.close()
        server.stop()
