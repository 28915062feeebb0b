"""A PostgreSQL queue that goes away for longer than a lease, with a real API (its lease
recovery running) and real workers: a worker holding a job, and a `flux-server worker`
process started in the middle of the outage. Once the database is back, the held job
completes once, on its first attempt; the late worker serves; nothing is lost or run twice.
Also: a lease that ran out but was not yet recovered can still be renewed, on both backends."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.api.maintenance import maintain_queue
from server.config import Settings
from server.jobs import Status
from server.queue.base import JobQueue, QueueUnavailable
from server.queue.factory import open_queue
from server.storage import LocalStorage
from tests.pg_server import PostgresServer, remove, start_postgres
from tests.server.conftest import api_settings, run_api_server
from tests.server.worker.support import REPO, ThreadWorker, completed, job, make_data_dir, pause_at_step
from tests.support import wait_until

LEASE = 2.0


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path_factory.mktemp("postgres-for-worker-outage"))
    yield server
    remove(server)


def start_worker_process(settings: Settings, worker_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "server.supervisor.cli", "worker", "--model", "tiny", "--device", "cpu",
         "--data-dir", str(settings.data_dir), "--queue-url", str(settings.queue_url),
         "--lease-seconds", str(LEASE), "--worker-id", worker_id],
        cwd=REPO,
    )  # fmt: skip


@pytest.mark.slow
def test_workers_wait_out_a_database_outage_longer_than_a_lease(
    own_postgres: PostgresServer, tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = make_data_dir(tmp_path / "data", tiny_model_dir)
    settings = api_settings(
        data_dir, queue_url=own_postgres.fresh_database_url(), lease_seconds=LEASE, model="tiny", device="cpu"
    )
    late: subprocess.Popen[bytes] | None = None
    with run_api_server(settings) as api_server:  # its lifespan runs the lease recovery
        api = open_queue(settings, role="api")
        steady = ThreadWorker(settings, "steady").start(api)
        try:
            reached, go = pause_at_step(steady.worker.runtime, monkeypatch, step=2)
            held = api.submit(job(num_inference_steps=4, output_format="png")).id
            assert reached.wait(60)

            own_postgres.stop()
            stopped_at = time.monotonic()
            late = start_worker_process(settings, "late")  # restarted in the middle of it
            go.set()  # the device finishes the job while the database is away
            wait_until(lambda: steady.worker.outage.down, 30, "the worker to notice the outage")
            wait_until(lambda: time.monotonic() - stopped_at > 3 * LEASE, what="an outage of three leases")
            assert late.poll() is None, "the late worker gave up instead of waiting"
            own_postgres.start()

            record = wait_until(completed(api, held), 120, "the held job")
            assert record.succeeded and record.attempts == 1 and record.worker == "steady"
            messages = [e.message for e in record.logs]
            assert "Worker lost; retrying" not in messages and messages.count("Started on steady") == 1
            assert "unavailable" not in str(record.result.model_dump())
            (image,) = record.result.images
            assert LocalStorage(settings.files_dir).path(image.file_name) is not None

            wait_until(lambda: steady.state(api) == "ready", 60, "the steady worker's state to be written")
            states = lambda: {w.worker_id: w.state for w in api.workers()}  # noqa: E731
            wait_until(lambda: states().get("late") == "ready", 300, "the late worker to be ready")
            monkeypatch.undo()
            after = [api.submit(job(seed=seed)).id for seed in range(4)]
            done = [wait_until(completed(api, rid), 120, "the jobs after the outage") for rid in after]
            assert all(r.succeeded and r.attempts == 1 for r in done)
            assert {r.worker for r in done} <= {"steady", "late"}
            assert api.counts().running == 0 and api.depth() == 0
        finally:
            steady.worker.stop()
            if late is not None and late.poll() is None:
                late.terminate()
                assert late.wait(60) == 0
            steady.join()
            api.close()
        assert api_server is not None


@pytest.fixture(params=["sqlite", "postgres"])
def queues(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[JobQueue, JobQueue]]:
    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_server").fresh_schema_url()
    settings = Settings(data_dir=tmp_path, queue_url=url, lease_seconds=0.3)
    api, worker = open_queue(settings, role="api"), open_queue(settings, role="worker")
    yield api, worker
    api.close()
    worker.close()


def test_a_lease_that_ran_out_but_was_not_recovered_can_be_renewed(queues: tuple[JobQueue, JobQueue]) -> None:
    api, worker = queues
    rid = api.submit(job()).id
    claimed = worker.claim("w", timeout=5)
    assert claimed.id == rid
    # The lease (0.3 s) runs out while nobody recovers it, as during an outage.
    wait_until(lambda: time.time() > claimed.started_at + 0.5, what="the lease to run out")
    assert worker.renew(rid, "w")
    assert api.recover_expired() == []
    assert api.get(rid).status is Status.IN_PROGRESS


def test_lease_recovery_waits_one_lease_after_the_queue_comes_back(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path, lease_seconds=3.0)  # three recovery passes
    api, worker = open_queue(settings, role="api"), open_queue(settings, role="worker")
    down = threading.Event()
    real_recover, real_depth = api.recover_expired, api.depth
    recovered_at: list[float] = []

    def unless_down(real):  # type: ignore[no-untyped-def]
        def call():  # type: ignore[no-untyped-def]
            if down.is_set():
                raise QueueUnavailable("the queue database is unavailable")
            return real()

        return call

    def recover() -> list[str]:
        ids = unless_down(real_recover)()
        if ids:
            recovered_at.append(time.monotonic())
        return ids

    monkeypatch.setattr(api, "recover_expired", recover)
    monkeypatch.setattr(api, "depth", unless_down(real_depth))
    renewed, lost = api.submit(job()).id, api.submit(job()).id
    assert {worker.claim("w", 5).id, worker.claim("w", 5).id} == {renewed, lost}

    loop = asyncio.new_event_loop()
    task = loop.create_task(maintain_queue(api, LocalStorage(settings.files_dir), settings))
    runner = threading.Thread(target=lambda: loop.run_until_complete(asyncio.wait([task])), daemon=True)
    heartbeat = threading.Event()
    down.set()
    runner.start()
    try:
        wait_until(lambda: api.get(lost).started_at + 3.5 < time.time(), what="both leases to run out")
        down.clear()
        back_at = time.monotonic()
        assert worker.renew(renewed, "w")  # a live worker renews as soon as it can, and on

        def keep_renewing() -> None:
            while not heartbeat.wait(0.5):
                worker.renew(renewed, "w")

        threading.Thread(target=keep_renewing, daemon=True).start()
        wait_until(lambda: api.get(lost).status is Status.IN_QUEUE, 10, "the lost job to be recovered")
        assert recovered_at[0] - back_at >= 2.9  # not before one lease (3 s) after the outage
        assert api.get(renewed).status is Status.IN_PROGRESS and api.get(renewed).attempts == 1
    finally:
        heartbeat.set()
        loop.call_soon_threadsafe(task.cancel)
        runner.join(10)
        api.close()
        worker.close()
