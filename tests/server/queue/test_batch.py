"""SubmitBatcher: concurrent submits share commits, in order, durable before anyone resumes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.jobs import Job, JobRecord
from server.queue.batch import MAX_BATCH, SubmitBatcher
from server.queue.sqlite import SQLiteQueue
from tests.server.queue.conftest import make_job


class CountingQueue(SQLiteQueue):
    """The real queue, recording the size of every batch it stores."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []
        self.fail_with: Exception | None = None

    def submit_many(self, jobs: list[Job]) -> list[tuple[JobRecord, int]]:
        if self.fail_with is not None:
            raise self.fail_with
        self.batches.append(len(jobs))
        return super().submit_many(jobs)


@pytest.fixture
def queue(tmp_path: Path):
    queue = CountingQueue(tmp_path / "queue.sqlite3", tmp_path / "run", role="api")
    yield queue
    queue.close()


def test_a_burst_is_stored_in_few_commits_in_order_and_durably(queue: CountingQueue, tmp_path: Path) -> None:
    batcher = SubmitBatcher(queue)
    other_process = SQLiteQueue(tmp_path / "queue.sqlite3", tmp_path / "run", role="bench")
    seen_by_other_process: list[int] = []

    async def submit(n: int) -> tuple[JobRecord, int]:
        record, position = await batcher.submit(make_job(prompt=f"job {n}"))
        # Resumed only once committed: another connection already sees the job.
        seen_by_other_process.append(other_process.get(record.id) is not None)
        return record, position

    async def burst() -> list[tuple[JobRecord, int]]:
        return await asyncio.gather(*(submit(n) for n in range(150)))

    try:
        results = asyncio.run(burst())
        assert [position for _, position in results] == list(range(150))
        assert [record.job.prompt for record, _ in results] == [f"job {n}" for n in range(150)]
        assert all(seen_by_other_process) and other_process.depth() == 150
        # One commit per MAX_BATCH jobs, not one per job.
        assert queue.batches == [MAX_BATCH, MAX_BATCH, 150 - 2 * MAX_BATCH]
        assert [other_process.position(record.id) for record, _ in results[:3]] == [0, 1, 2]
    finally:
        other_process.close()


def test_a_lone_submit_is_stored_at_once(queue: CountingQueue) -> None:
    async def one() -> tuple[JobRecord, int]:
        return await asyncio.wait_for(SubmitBatcher(queue).submit(make_job()), 1)

    record, position = asyncio.run(one())
    assert position == 0 and queue.get(record.id) is not None and queue.batches == [1]


def test_a_failed_commit_fails_every_caller_of_its_batch(queue: CountingQueue) -> None:
    queue.fail_with = RuntimeError("disk full")
    batcher = SubmitBatcher(queue)

    async def burst() -> list:
        return await asyncio.gather(*(batcher.submit(make_job()) for _ in range(3)), return_exceptions=True)

    outcomes = asyncio.run(burst())
    assert [str(outcome) for outcome in outcomes] == ["disk full"] * 3
    assert queue.depth() == 0
