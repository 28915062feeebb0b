"""AsyncQueue: queue calls off the event loop, group commit, and watching without missed changes."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from server.jobs import Job, JobRecord, Status, cancelled_error
from server.queue.aio import MAX_BATCH, AsyncQueue
from server.queue.sqlite import SQLiteQueue


def make_job(**overrides: object) -> Job:
    return Job(**{"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, **overrides})


class CountingQueue(SQLiteQueue):
    """The real queue, recording the size of every batch it stores and the threads it ran on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.fail_with: Exception | None = None

    def submit_many(self, jobs: list[Job]) -> list[tuple[JobRecord, int]]:
        self.threads.add(threading.get_ident())
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(len(jobs))
        return super().submit_many(jobs)

    def get(self, request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        self.threads.add(threading.get_ident())
        return super().get(request_id, with_logs=with_logs)

    async def wait_for_change(self, request_id: str, timeout: float) -> None:
        # Without the backend's short fallback poll: a missed notification shows as a long wait.
        await self.notifier.wait_for(request_id, timeout)


@pytest.fixture
def queue(tmp_path: Path):
    queue = CountingQueue(tmp_path / "queue.sqlite3", tmp_path / "run", role="api")
    yield queue
    queue.close()


def test_a_burst_is_stored_in_few_commits_in_order_and_durably(queue: CountingQueue, tmp_path: Path) -> None:
    other_process = SQLiteQueue(tmp_path / "queue.sqlite3", tmp_path / "run", role="bench")
    seen_by_other_process: list[bool] = []

    async def burst() -> list[tuple[JobRecord, int]]:
        aqueue = AsyncQueue(queue)

        async def submit(n: int) -> tuple[JobRecord, int]:
            record, position = await aqueue.submit(make_job(prompt=f"job {n}"))
            # Resumed only once committed: another connection already sees the job.
            seen_by_other_process.append(other_process.get(record.id) is not None)
            return record, position

        try:
            return await asyncio.gather(*(submit(n) for n in range(150)))
        finally:
            aqueue.close()

    try:
        results = asyncio.run(burst())
        assert [position for _, position in results] == list(range(150))
        assert [record.job.prompt for record, _ in results] == [f"job {n}" for n in range(150)]
        assert all(seen_by_other_process) and other_process.depth() == 150
        # At most MAX_BATCH jobs per commit, and far fewer commits than jobs.
        assert sum(queue.batches) == 150 and max(queue.batches) <= MAX_BATCH
        assert len(queue.batches) <= 150 // MAX_BATCH + 1
        assert [other_process.position(record.id) for record, _ in results[:3]] == [0, 1, 2]
        assert threading.main_thread().ident not in queue.threads  # never on the loop's thread
    finally:
        other_process.close()


def test_a_lone_submit_is_stored_at_once(queue: CountingQueue) -> None:
    async def one() -> tuple[JobRecord, int]:
        aqueue = AsyncQueue(queue)
        try:
            return await asyncio.wait_for(aqueue.submit(make_job()), 5)
        finally:
            aqueue.close()

    record, position = asyncio.run(one())
    assert position == 0 and queue.get(record.id) is not None and queue.batches == [1]


def test_a_failed_commit_fails_every_caller_of_its_batch(queue: CountingQueue) -> None:
    queue.fail_with = RuntimeError("disk full")

    async def burst() -> list:
        aqueue = AsyncQueue(queue)
        try:
            submits = (aqueue.submit(make_job()) for _ in range(3))
            return await asyncio.gather(*submits, return_exceptions=True)
        finally:
            aqueue.close()

    outcomes = asyncio.run(burst())
    assert [str(outcome) for outcome in outcomes] == ["disk full"] * 3
    assert queue.depth() == 0


def test_the_loop_keeps_running_while_a_queue_call_blocks(queue: CountingQueue) -> None:
    """A slow store (a long write lock, a slow disk) stalls the call, not the event loop."""
    release = threading.Event()
    original_get = queue.get

    def slow_get(request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        release.wait(10)
        return original_get(request_id, with_logs=with_logs)

    queue.get = slow_get  # type: ignore[method-assign]

    async def scenario() -> int:
        aqueue = AsyncQueue(queue)
        try:
            pending = asyncio.ensure_future(aqueue.get("unknown"))
            ticks = 0
            while ticks < 20:  # the loop turns while the read is blocked
                await asyncio.sleep(0.001)
                ticks += 1
            assert not pending.done()
            release.set()
            assert await asyncio.wait_for(pending, 5) is None
            return ticks
        finally:
            aqueue.close()

    assert asyncio.run(scenario()) == 20


def test_watch_sees_a_change_made_while_the_record_is_read(queue: CountingQueue, tmp_path: Path) -> None:
    """The wait starts before each read: a completion landing during the read (or while the
    caller handles the record) ends the wait at once, not after the fallback timeout."""
    record = queue.submit(make_job())
    worker = SQLiteQueue(tmp_path / "queue.sqlite3", tmp_path / "run", role="worker")
    original_get = queue.get
    changed_during_read = threading.Event()
    loop: asyncio.AbstractEventLoop | None = None

    def get_then_change(request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        current = original_get(request_id, with_logs=with_logs)
        if not changed_during_read.is_set():
            changed_during_read.set()
            claimed = worker.claim("w", timeout=0)
            assert claimed is not None and worker.fail(claimed.id, "w", cancelled_error())
            # Let the loop turn a few times, so it has read those notifications before this
            # read returns: a wait that starts only after the read would never see them.
            assert loop is not None
            for _ in range(3):
                asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(5)
        return current

    queue.get = get_then_change  # type: ignore[method-assign]

    async def scenario() -> tuple[list[Status], float]:
        nonlocal loop
        loop = asyncio.get_running_loop()
        aqueue = AsyncQueue(queue)
        await queue.wait_for_change("warm-up", 0.01)  # the API's socket is read from now on
        seen: list[Status] = []
        started = time.monotonic()
        try:
            async for current, _ in aqueue.watch(record.id, timeout=30.0):
                assert current is not None
                seen.append(current.status)
                if current.status is Status.COMPLETED:
                    break
            return seen, time.monotonic() - started
        finally:
            aqueue.close()

    try:
        seen, elapsed = asyncio.run(scenario())
    finally:
        worker.close()
    # The first read returned the queued record although the job changed during that read;
    # the second read came from the notification, long before the 30 s timeout.
    assert seen == [Status.IN_QUEUE, Status.COMPLETED]
    assert elapsed < 10.0
