"""QueuedCounts on its own: which submit reads the queue's count, which waits, and that every
admission lands on the count the next submits see. The queue is a coroutine the test answers
by hand (the API's tests run it against the real queue: test_tenancy.py)."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest

from server.api import queued_counts
from server.api.queued_counts import ActiveCount, QueuedCounts


class HandAnsweredCount:
    """The queue's count of a tenant, answered when the test says so (`answer`)."""

    def __init__(self) -> None:
        self.asked: list[asyncio.Future[int]] = []

    async def __call__(self, tenant: str | None) -> int:
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.asked.append(answer)
        return await answer

    async def answer(self, value: int | BaseException, which: int = -1) -> None:
        future = self.asked[which]
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)
        await settle()  # the read and its waiters


async def settle() -> None:
    for _ in range(5):  # let every task that can run, run
        await asyncio.sleep(0)


async def started(task: asyncio.Task[object]) -> None:
    await settle()
    assert not task.done()


async def read_now(
    counts: QueuedCounts, queue: HandAnsweredCount, value: int, *, read_after: float = -math.inf
) -> ActiveCount:
    """A count that waits for a read, the read answered `value`: what the waiter got."""
    reading = asyncio.ensure_future(counts.count("a", read_after=read_after))
    await started(reading)
    await queue.answer(value)
    return reading.result()


@pytest.mark.anyio
async def test_submits_without_a_count_share_one_read_and_see_each_others_admissions():
    queue = HandAnsweredCount()
    counts = QueuedCounts(queue)
    waiting = [asyncio.ensure_future(counts.count("a")) for _ in range(3)]
    await started(waiting[0])
    assert len(queue.asked) == 1  # one read for the three
    await queue.answer(4)
    first, second, third = [task.result() for task in waiting]
    assert first is second is third and first.value == 4
    counts.admit("a", first)
    assert (await counts.count("a")).value == 5 and len(queue.asked) == 1  # reused, no read


@pytest.mark.anyio
async def test_an_older_count_admits_at_once_while_one_read_refreshes_it(monkeypatch):
    monkeypatch.setattr(queued_counts, "REUSE_SECONDS", 0.0)
    queue = HandAnsweredCount()
    counts = QueuedCounts(queue)
    kept = await read_now(counts, queue, 1)
    # Older than REUSE_SECONDS: served at once, twice, with one background read for both.
    assert (await counts.count("a")) is kept and (await counts.count("a")) is kept
    await settle()
    assert len(queue.asked) == 2
    counts.admit("a", kept)  # admitted while the read runs: the read adds it
    await queue.answer(1)  # the queue still holds 1 (the admitted submit is not stored yet)
    refreshed = await counts.count("a")
    assert refreshed is not kept and refreshed.value == 2


@pytest.mark.anyio
async def test_a_count_too_old_to_use_is_waited_for(monkeypatch):
    queue = HandAnsweredCount()
    counts = QueuedCounts(queue)
    await read_now(counts, queue, 0)
    monkeypatch.setattr(queued_counts, "REUSE_SECONDS", 0.0)
    monkeypatch.setattr(queued_counts, "USABLE_SECONDS", 0.0)
    assert (await read_now(counts, queue, 3)).value == 3


@pytest.mark.anyio
async def test_overlapping_reads_keep_the_newest_and_admissions_land_on_it():
    """Two refusals that arrived at different times each need a read started after them; the
    reads may end in any order, and each waiter must get (and add to) the newest count."""
    queue = HandAnsweredCount()
    counts = QueuedCounts(queue)
    await read_now(counts, queue, 2)
    first = asyncio.ensure_future(counts.count("a", read_after=time.monotonic()))
    await started(first)
    second = asyncio.ensure_future(counts.count("a", read_after=time.monotonic()))
    await started(second)
    assert len(queue.asked) == 3
    await queue.answer(0, which=2)  # the later read ends first...
    await queue.answer(1, which=1)  # ...the earlier one after it, with an older figure
    assert first.result() is second.result() and first.result().value == 0
    counts.admit("a", first.result())
    assert (await counts.count("a")).value == 1


@pytest.mark.anyio
async def test_a_failed_read_fails_its_waiters_and_is_not_kept():
    queue = HandAnsweredCount()
    counts = QueuedCounts(queue)
    waiting = [asyncio.ensure_future(counts.count("a")) for _ in range(2)]
    await started(waiting[0])
    await queue.answer(ConnectionError("database down"))
    for task in waiting:
        with pytest.raises(ConnectionError):
            task.result()
    assert (await read_now(counts, queue, 0)).value == 0 and len(queue.asked) == 2  # read again


@pytest.mark.anyio
async def test_a_stored_submit_leaves_the_in_flight_count():
    """A read counts the submits admitted and not stored yet; once stored, the queue's count
    holds them and they are not added twice."""
    queue = HandAnsweredCount()
    counts = QueuedCounts(queue)
    counts.admit("a", await read_now(counts, queue, 0))
    # Not stored yet (the queue holds 0): in flight, added.
    assert (await read_now(counts, queue, 0, read_after=time.monotonic())).value == 1
    counts.stored("a")
    # Stored now (the queue holds 1): not added again.
    assert (await read_now(counts, queue, 1, read_after=time.monotonic())).value == 1


@pytest.mark.anyio
async def test_warm_reads_each_quota_tenant_and_survives_a_failed_read():
    queue = HandAnsweredCount()
    counts = QueuedCounts(queue)
    warming = asyncio.ensure_future(counts.warm(["a", "b"]))
    await started(warming)
    await queue.answer(3, which=0)
    await queue.answer(ConnectionError("database down"), which=1)
    await warming  # no error: a failed read is left to the submits
    assert (await counts.count("a")).value == 3 and len(queue.asked) == 2
    reading = asyncio.ensure_future(counts.count("b"))  # b's failed read was not kept
    await started(reading)
    await queue.answer(2)
    assert reading.result().value == 2


@pytest.mark.anyio
async def test_a_failed_background_refresh_keeps_the_usable_count_and_is_tried_again(monkeypatch, caplog):
    """The database goes down while a usable count is kept: submits go on being admitted on
    it (their store then fails on its own), the failure is not an unretrieved task error,
    and the next admission starts a new read."""
    monkeypatch.setattr(queued_counts, "REUSE_SECONDS", 0.0)
    queue = HandAnsweredCount()
    counts = QueuedCounts(queue)
    kept = await read_now(counts, queue, 1)
    assert (await counts.count("a")) is kept  # starts a refresh in the background
    await settle()
    with caplog.at_level(logging.DEBUG, logger="flux_server.api"):
        await queue.answer(ConnectionError("database down"))
    assert "count read for tenant 'a' failed: database down" in caplog.text
    assert (await counts.count("a")) is kept  # still served, and a new refresh starts
    await settle()
    assert len(queue.asked) == 3
    await queue.answer(0)
    assert (await counts.count("a")).value == 0
