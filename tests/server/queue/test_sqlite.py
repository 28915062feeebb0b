"""SQLiteQueue against real database files, with real threads and processes where it matters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from server.jobs import Job, JobError, JobResult, OutputImage, Status, Webhook
from server.queue.base import CancelOutcome
from server.queue.sqlite import SQLiteQueue

REPO = Path(__file__).resolve().parents[3]


def make_job(**overrides: object) -> Job:
    return Job(**{"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, **overrides})


def make_result(seed: int = 1) -> JobResult:
    image = OutputImage(width=64, height=64, content_type="image/jpeg", file_name="x.jpg", file_size=10)
    return JobResult(
        images=[image],
        seed=seed,
        prompt="a fox",
        has_nsfw_concepts=[False],
        nsfw_checked=False,
        timings={"inference": 0.1},
        preset="none",
    )


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "queue.sqlite3", tmp_path / "run"


@pytest.fixture
def api(paths: tuple[Path, Path]):
    queue = SQLiteQueue(*paths, role="api")
    yield queue
    queue.close()


@pytest.fixture
def worker(paths: tuple[Path, Path]):
    queue = SQLiteQueue(*paths, role="worker", lease_seconds=30.0)
    yield queue
    queue.close()


def test_submit_get_and_positions_honour_priority_then_fifo(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    low1 = api.submit(make_job(priority="low")).id
    normal1 = api.submit(make_job()).id
    low2 = api.submit(make_job(priority="low")).id
    normal2 = api.submit(make_job(prompt="second")).id

    record = api.get(normal2)
    assert record is not None and record.status is Status.IN_QUEUE and record.job.prompt == "second"
    assert api.get("no-such-id") is None
    assert [api.position(i) for i in (normal1, normal2, low1, low2)] == [0, 1, 2, 3]
    assert api.depth() == 4

    claimed = [worker.claim("w1", timeout=0).id for _ in range(4)]
    assert claimed == [normal1, normal2, low1, low2]
    assert worker.claim("w1", timeout=0) is None
    assert api.position(normal1) is None and api.depth() == 0

    started = api.get(normal1)
    assert started.status is Status.IN_PROGRESS and started.worker == "w1" and started.attempts == 1
    assert started.logs[0].message == "Started on w1"
    assert len(started.logs[0].timestamp) == len("2024-12-20T15:37:17.120314")


def counted_ahead(queue: SQLiteQueue, rank: int) -> int:
    """What the counts table says a new job of class `rank` would have ahead of it."""
    with contextlib.closing(queue.connect()) as conn:
        return conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority_rank <= ?", (rank,)
        ).fetchone()[0]


def test_submit_position_and_depth_follow_every_way_in_and_out_of_the_queue(
    api: SQLiteQueue, worker: SQLiteQueue
) -> None:
    def check() -> None:
        # The counts the triggers keep agree with counting the rows.
        for rank in (0, 1):
            assert api.submit_with_position(make_job(priority="low" if rank else "normal"))[1] == (
                counted_ahead(api, rank) - 1
            )
        assert api.depth() == counted_ahead(api, 1)

    low, low_position = api.submit_with_position(make_job(priority="low"))
    normal, normal_position = api.submit_with_position(make_job())
    assert (low_position, normal_position) == (0, 0)  # a normal job goes before the low one
    assert api.submit_with_position(make_job(priority="low"))[1] == 2
    assert api.depth() == 3
    check()
    running = worker.claim("w1", timeout=0)
    assert running is not None and running.id == normal.id
    check()
    assert worker.requeue(running.id, "w1")  # back to the queue
    check()
    assert api.cancel(low.id) is CancelOutcome.CANCELLED  # leaves from the middle
    check()
    running = worker.claim("w1", timeout=0)
    assert worker.complete(running.id, "w1", make_result())
    assert api.release_worker("w1") == []
    check()
    api.purge(older_than=time.time() + 1)
    check()


def test_counts_of_a_database_made_before_them_start_from_its_queued_jobs(paths: tuple[Path, Path]) -> None:
    first = SQLiteQueue(*paths, role="api")
    for priority in ("normal", "low", "low"):
        first.submit(make_job(priority=priority))
    with contextlib.closing(first.connect()) as conn:  # as a database made by an earlier version
        conn.execute("DROP TABLE queue_counts")
        for trigger in ("submit", "requeue", "leave", "delete"):
            conn.execute(f"DROP TRIGGER queue_counts_{trigger}")
    first.close()
    reopened = SQLiteQueue(*paths, role="api")
    try:
        assert reopened.depth() == 3
        assert reopened.submit_with_position(make_job())[1] == 1
        assert reopened.submit_with_position(make_job(priority="low"))[1] == 4
    finally:
        reopened.close()


def test_submit_with_given_id_and_durability_across_instances(paths: tuple[Path, Path]) -> None:
    first = SQLiteQueue(*paths, role="api")
    first.submit(make_job(), request_id="fixed-id")
    first.close()
    again = SQLiteQueue(*paths, role="api")
    try:
        record = again.get("fixed-id")
        assert record is not None and record.status is Status.IN_QUEUE and record.job.prompt == "a fox"
    finally:
        again.close()


def test_input_image_round_trips_outside_the_json(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    image = bytes(range(256)) * 64
    rid = api.submit(make_job(task="image-to-image", image=image)).id
    assert api.get(rid).job.image == image
    assert worker.claim("w1", timeout=0).job.image == image
    conn = api.connect()
    try:
        (job_json,) = conn.execute("SELECT job_json FROM jobs WHERE id = ?", (rid,)).fetchone()
    finally:
        conn.close()
    assert len(job_json) < 2000


def test_log_progress_complete_and_only_the_lease_holder_may_finish(
    api: SQLiteQueue, worker: SQLiteQueue
) -> None:
    rid = api.submit(make_job()).id
    assert worker.claim("w1", timeout=0).id == rid
    worker.log(rid, "step 1/2", progress=0.5)
    record = api.get(rid)
    assert record.progress == 0.5 and [e.message for e in record.logs] == ["Started on w1", "step 1/2"]
    assert api.get(rid, with_logs=False).logs == []

    assert not worker.complete(rid, "someone-else", make_result())
    assert not worker.renew(rid, "someone-else")
    assert worker.renew(rid, "w1")
    assert worker.complete(rid, "w1", make_result(seed=7))
    done = api.get(rid)
    assert done.status is Status.COMPLETED and done.succeeded and done.result.seed == 7
    assert done.completed_at is not None and done.progress == 1.0
    assert not worker.complete(rid, "w1", make_result())  # a second completion is refused
    assert not worker.fail(rid, None, JobError(message="late", error_type="x"))


def test_cancel_queued_running_completed_and_unknown(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    running = api.submit(make_job()).id
    queued = api.submit(make_job()).id
    assert worker.claim("w1", timeout=0).id == running

    assert api.cancel(queued) is CancelOutcome.CANCELLED
    cancelled = api.get(queued)
    assert cancelled.status is Status.COMPLETED and cancelled.error.error_type == "request_cancelled"

    assert not worker.is_cancel_requested(running)
    assert api.cancel(running) is CancelOutcome.REQUESTED
    assert worker.is_cancel_requested(running)
    assert api.get(running).status is Status.IN_PROGRESS
    # the worker notices at its next step and fails the job as cancelled
    from server.jobs import cancelled_error

    assert worker.fail(running, "w1", cancelled_error())
    assert api.get(running).error.error_type == "request_cancelled"

    assert api.cancel(running) is CancelOutcome.ALREADY_COMPLETED
    assert api.cancel("unknown") is CancelOutcome.NOT_FOUND
    assert worker.claim("w1", timeout=0) is None  # the cancelled queued job never starts


def test_expired_lease_requeues_at_head_once_then_runner_disconnected(paths: tuple[Path, Path]) -> None:
    api = SQLiteQueue(*paths, role="api")
    worker = SQLiteQueue(*paths, role="worker", lease_seconds=0.05)
    try:
        rid = api.submit(make_job()).id
        other = api.submit(make_job()).id
        assert worker.claim("w1", timeout=0).id == rid
        time.sleep(0.1)
        assert api.recover_expired() == [rid]
        record = api.get(rid)
        assert record.status is Status.IN_QUEUE and record.worker is None
        assert record.logs[-1].message == "Worker lost; retrying"
        assert api.position(rid) == 0 and api.position(other) == 1  # back at the head

        assert worker.claim("w2", timeout=0).id == rid
        assert not worker.complete(rid, "w1", make_result())  # the first worker lost its lease
        time.sleep(0.1)
        assert api.recover_expired() == [rid]
        failed = api.get(rid)
        assert failed.status is Status.COMPLETED and failed.attempts == 2
        assert failed.error.error_type == "runner_disconnected" and failed.error.status_code == 503
        assert api.recover_expired() == []
    finally:
        api.close()
        worker.close()


def test_release_worker_requeues_its_jobs_now(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    rid = api.submit(make_job()).id
    assert worker.claim("w1", timeout=0).id == rid
    assert api.release_worker("w-other") == []
    assert api.release_worker("w1") == [rid]
    assert api.get(rid).status is Status.IN_QUEUE
    assert worker.claim("w2", timeout=0).id == rid
    assert worker.complete(rid, "w2", make_result())


def test_release_of_a_cancel_requested_job_completes_it_as_cancelled(
    api: SQLiteQueue, worker: SQLiteQueue
) -> None:
    rid = api.submit(make_job()).id
    worker.claim("w1", timeout=0)
    api.cancel(rid)
    assert api.release_worker("w1") == [rid]
    assert api.get(rid).error.error_type == "request_cancelled"


def test_requeue_by_a_stopping_worker_does_not_count_an_attempt(
    api: SQLiteQueue, worker: SQLiteQueue
) -> None:
    rid = api.submit(make_job()).id
    worker.claim("w1", timeout=0)
    assert worker.requeue(rid, "w1")
    record = api.get(rid)
    assert record.status is Status.IN_QUEUE and record.attempts == 0


def test_start_deadline_fails_the_job_without_starting_it(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    late = api.submit(make_job(start_deadline=time.time() - 1)).id
    fine = api.submit(make_job(start_deadline=time.time() + 60)).id
    claimed = worker.claim("w1", timeout=0)
    assert claimed.id == fine
    record = api.get(late)
    assert record.status is Status.COMPLETED and record.started_at is None
    assert record.error.error_type == "request_timeout" and record.error.status_code == 504

    expiring = api.submit(make_job(start_deadline=time.time() + 0.05)).id
    time.sleep(0.1)
    assert api.recover_expired() == [expiring]
    assert api.get(expiring).error.error_type == "request_timeout"


def test_purge_returns_and_deletes_old_completed_records(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    done = api.submit(make_job()).id
    waiting = api.submit(make_job()).id
    worker.claim("w1", timeout=0)
    worker.complete(done, "w1", make_result())
    assert api.purge(older_than=time.time() - 60) == []
    purged = api.purge(older_than=time.time() + 1)
    assert [r.id for r in purged] == [done] and purged[0].result.images[0].file_name == "x.jpg"
    assert api.get(done) is None and api.get(waiting) is not None


def test_deliveries_row_on_every_completion_path_with_a_webhook(
    api: SQLiteQueue, worker: SQLiteQueue
) -> None:
    hook = Webhook(url="https://example.test/hook", kind="fal")
    completed = api.submit(make_job(webhook=hook)).id
    no_hook = api.submit(make_job()).id
    cancelled = api.submit(make_job(webhook=hook)).id
    timed_out = api.submit(make_job(webhook=hook, start_deadline=time.time() + 0.05)).id
    worker.claim("w1", timeout=0)
    worker.complete(completed, "w1", make_result())
    worker.claim("w1", timeout=0)
    worker.complete(no_hook, "w1", make_result())
    api.cancel(cancelled)
    time.sleep(0.1)
    api.recover_expired()

    conn = api.connect()
    try:
        rows = dict(conn.execute("SELECT request_id, due_at FROM deliveries").fetchall())
    finally:
        conn.close()
    assert set(rows) == {completed, cancelled, timed_out}
    assert all(abs(due - time.time()) < 5 for due in rows.values())


def test_workers_registry(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    worker.set_worker_state("w1", "loading", device="cpu", model="tiny")
    worker.set_worker_state("w1", "ready", device="cpu", model="tiny", detail="ok")
    (info,) = api.workers()
    assert (info.worker_id, info.state, info.detail, info.pid) == ("w1", "ready", "ok", os.getpid())
    api.remove_worker("w1")
    assert api.workers() == []


def test_claim_is_atomic_across_threads(paths: tuple[Path, Path], api: SQLiteQueue) -> None:
    ids = {api.submit(make_job()).id for _ in range(60)}
    queues = [SQLiteQueue(*paths, role="worker") for _ in range(2)]
    claimed: list[list[str]] = [[], [], [], []]

    def drain(slot: int) -> None:
        queue = queues[slot % 2]
        while (record := queue.claim(f"w{slot}", timeout=0)) is not None:
            claimed[slot].append(record.id)

    threads = [threading.Thread(target=drain, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for queue in queues:
        queue.close()
    flat = [rid for chunk in claimed for rid in chunk]
    assert len(flat) == len(set(flat)) == 60 and set(flat) == ids


_CLAIMER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from server.queue.sqlite import SQLiteQueue

    queue = SQLiteQueue(Path(sys.argv[1]), Path(sys.argv[2]), role="worker")
    mode = sys.argv[3]
    print("ready", flush=True)
    if mode == "once":
        record = queue.claim("remote", timeout=10)
        print(time.time(), record.id if record else None, flush=True)
    else:
        timeout = 10.0  # the first job: wait for the test to submit
        while (record := queue.claim(mode, timeout=timeout)) is not None:
            print(record.id, flush=True)
            timeout = 0.5
    queue.close()
    """
)


def _start_claimer(paths: tuple[Path, Path], mode: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _CLAIMER, str(paths[0]), str(paths[1]), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout.readline().strip() == "ready"
    return process


def test_claim_is_atomic_across_processes(paths: tuple[Path, Path], api: SQLiteQueue) -> None:
    processes = [_start_claimer(paths, f"p{n}") for n in range(2)]
    ids = {api.submit(make_job()).id for _ in range(80)}
    # read through the same buffered pipe as `_start_claimer` (communicate() would skip
    # what readline() already buffered)
    outputs = [process.stdout.read() for process in processes]
    assert [process.wait(timeout=60) for process in processes] == [0, 0]
    flat = [rid for out in outputs for rid in out.split()]
    print("claims per process:", [len(out.split()) for out in outputs])
    assert len(flat) == len(set(flat)) == 80 and set(flat) == ids


def test_a_blocked_claim_in_another_process_wakes_within_milliseconds_of_submit(
    paths: tuple[Path, Path], api: SQLiteQueue
) -> None:
    process = _start_claimer(paths, "once")
    time.sleep(0.3)  # let it reach the blocking wait
    submitted_at = time.time()
    rid = api.submit(make_job()).id
    claimed_at, claimed_id = process.stdout.read().split()
    assert process.wait(timeout=20) == 0
    latency_ms = (float(claimed_at) - submitted_at) * 1000
    print(f"cross-process dispatch (submit -> claim returned): {latency_ms:.2f} ms")
    assert claimed_id == rid
    assert latency_ms < 100


def test_wait_for_change_wakes_on_log_from_a_worker(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    rid = api.submit(make_job()).id
    worker.claim("w1", timeout=0)

    def step_later() -> None:
        time.sleep(0.2)
        worker.log(rid, "step 1/2", progress=0.5)

    async def wait() -> float:
        # the claim's own notification is already in the socket: consume it first
        await api.wait_for_change(rid, timeout=0.2)
        thread.start()
        began = time.monotonic()
        await api.wait_for_change(rid, timeout=5)
        return time.monotonic() - began

    thread = threading.Thread(target=step_later)
    waited = asyncio.run(wait())
    thread.join()
    assert 0.15 < waited < 0.45  # woken by the log line, not by the 0.5 s fallback
    assert api.get(rid).progress == 0.5
