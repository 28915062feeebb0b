"""The API's view of the queue: every `JobQueue` call as a coroutine that runs off the loop.

A `JobQueue` method may block on I/O (a SQLite commit waits for the disk and for the write
lock that workers share; a database server is a network round trip). Route code runs on the
event loop, where such a wait would stall every other request, so the API never calls the
queue directly: it awaits `AsyncQueue`, which runs each call on a small dedicated thread pool.

Two things on top of that:

- Group commit. Concurrent submits share one commit: a submit parks its job, and one flush at
  a time stores every job parked meanwhile (`JobQueue.submit_many`, at most `MAX_BATCH`).
  Each caller resumes only after that commit, so a response never announces a job that is
  not durable. An idle server flushes a lone submit at once.
- Watching a request without missing a change. `wait_for_change` only sees notifications
  that arrive while it waits, and a read now takes a thread hop; `watch` therefore starts
  waiting before it reads, so a change that lands during the read ends the wait at once.
- A full disk. `admit` (the free-space floor, server/disk.py) runs before each batch is
  stored, in the batch's thread; a batch it refuses, or whose commit fails for want of space,
  raises `DiskFull` to every caller of the batch, and none of its jobs was stored. Any other
  call that fails for want of space raises `DiskFull` too (answered 507).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue as thread_queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from server.disk import DiskFull, is_disk_full
from server.jobs import Job, JobRecord, Status, new_request_id
from server.queue.base import CancelOutcome, JobQueue, WorkerInfo
from server.queue.idempotency import IdempotencyKey, Submitted
from server.queue.usage import UsageRow

T = TypeVar("T")

# Most jobs one commit carries: bigger batches save little more and hold back early responses.
MAX_BATCH = 64
# Threads for queue calls: one can serve reads while the other waits on a commit; more only
# split the batches (measured with scripts/bench_api.py on 2 cores).
THREADS = 2
# Most calls one thread runs before it wakes the event loop with their results.
MAX_CALLS_PER_WAKE_UP = 32


class CallThreads:
    """A few daemon threads running blocking calls for coroutines.

    Leaner than `loop.run_in_executor` (no concurrent future with its lock and chained
    callbacks), and calls that queue up meanwhile are taken together: a thread runs every call
    waiting for it, then wakes the event loop once for all of them. Under a flood of status
    polls that is one loop wake-up per batch instead of one per poll."""

    def __init__(self, count: int) -> None:
        self._calls: thread_queue.SimpleQueue[Any] = thread_queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=f"queue-call-{n}", daemon=True) for n in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, call: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, future, call))
        return future

    def _serve(self) -> None:
        while True:
            batch = [self._calls.get()]
            with contextlib.suppress(thread_queue.Empty):
                while len(batch) < MAX_CALLS_PER_WAKE_UP:
                    batch.append(self._calls.get_nowait())
            settled: dict[asyncio.AbstractEventLoop, list[tuple[Any, ...]]] = {}
            stop = False
            for item in batch:
                if item is None:
                    stop = True
                    continue
                loop, future, call = item
                try:
                    outcome = (future, call(), None)
                except BaseException as exc:  # handed to the awaiting coroutine
                    outcome = (future, None, exc)
                settled.setdefault(loop, []).append(outcome)
            for loop, outcomes in settled.items():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(_settle, outcomes)
            if stop:
                return

    def close(self) -> None:
        for _ in self._threads:
            self._calls.put(None)


def _settle(outcomes: list[tuple[asyncio.Future[Any], object, BaseException | None]]) -> None:
    for future, result, exc in outcomes:
        if future.done():  # the awaiting coroutine was cancelled meanwhile
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


class AsyncQueue:
    def __init__(
        self, queue: JobQueue, *, threads: int = THREADS, admit: Callable[[], None] | None = None
    ) -> None:
        self.sync = queue  # for code that already runs in a thread, and for tests
        self._admit = admit  # raises DiskFull to refuse a batch of submits
        self._threads = CallThreads(threads)
        self._pending: list[tuple[Job, asyncio.Future[tuple[JobRecord, int]]]] = []
        self._flush_task: asyncio.Task[None] | None = None

    async def _call(self, function: Callable[..., T], /, *args: object, **kwargs: object) -> T:
        try:
            return await self._threads.run(functools.partial(function, *args, **kwargs))
        except DiskFull:
            raise
        except Exception as exc:
            if is_disk_full(exc):  # SQLite's "database or disk is full", ENOSPC
                raise DiskFull() from exc
            raise

    # --- producer side ---------------------------------------------------------------------
    async def submit(self, job: Job) -> tuple[JobRecord, int]:
        """Store `job` durably (group commit); returns its record and queue position."""
        future: asyncio.Future[tuple[JobRecord, int]] = asyncio.get_running_loop().create_future()
        self._pending.append((job, future))
        if self._flush_task is None or self._flush_task.done():
            # The task starts on the next loop turn: submits arriving in this one join it.
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        """Store parked jobs, one batch at a time, until none is left."""
        while self._pending:
            batch = [(job, f) for job, f in self._pending[:MAX_BATCH] if not f.cancelled()]
            del self._pending[:MAX_BATCH]
            if batch:
                await self._store(batch)

    async def _store(self, batch: list[tuple[Job, asyncio.Future[tuple[JobRecord, int]]]]) -> None:
        try:
            stored = await self._call(self._submit_many, [job for job, _ in batch])
        except Exception as exc:  # every caller of this batch gets the error (507, 503, 500)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, stored, strict=True):
            if not future.done():
                future.set_result(result)

    async def submit_once(self, job: Job, key: IdempotencyKey) -> Submitted:
        """A keyed submit (`JobQueue.store_once`): its own commit, outside the group commit
        (the key's row and the job are one transaction)."""
        return await self._call(self._submit_once, job, key)

    def _submit_once(self, job: Job, key: IdempotencyKey) -> Submitted:
        if self._admit is not None:
            self._admit()
        return self.sync.store_once(job, new_request_id(), key)

    def _submit_many(self, jobs: list[Job]) -> list[tuple[JobRecord, int]]:
        if self._admit is not None:
            self._admit()
        return self.sync.submit_many(jobs)

    async def get(self, request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        return await self._call(self.sync.get, request_id, with_logs=with_logs)

    async def get_with_position(
        self, request_id: str, *, with_logs: bool = True
    ) -> tuple[JobRecord | None, int | None]:
        """The record and, while it is queued, its position: one thread hop for a status poll."""
        return await self._call(self._get_with_position, request_id, with_logs)

    def _get_with_position(self, request_id: str, with_logs: bool) -> tuple[JobRecord | None, int | None]:
        record = self.sync.get(request_id, with_logs=with_logs)
        if record is None or record.status is not Status.IN_QUEUE:
            return record, None
        return record, self.sync.position(request_id)

    async def position(self, request_id: str) -> int | None:
        return await self._call(self.sync.position, request_id)

    async def active_count(self, tenant: str | None) -> int:
        return await self._call(self.sync.active_count, tenant)

    async def depth(self) -> int:
        return await self._call(self.sync.depth)

    async def cancel(self, request_id: str) -> CancelOutcome:
        return await self._call(self.sync.cancel, request_id)

    async def usage(self, first_day: str | None, last_day: str | None) -> list[UsageRow]:
        return await self._call(self.sync.usage, first_day, last_day)

    async def workers(self) -> list[WorkerInfo]:
        return await self._call(self.sync.workers)

    async def wait_for_change(self, request_id: str, timeout: float) -> None:
        """The queue's own wait: it runs on the loop already (it reads no store)."""
        await self.sync.wait_for_change(request_id, timeout)

    async def watch(
        self, request_id: str, *, timeout: float, with_logs: bool = True
    ) -> AsyncIterator[tuple[JobRecord | None, int | None]]:
        """(record, queue position) now, then again after every possible change, at least
        every `timeout` seconds; the caller stops iterating when it has seen enough.

        The wait for the next change starts before each read (a waiter registers before its
        first suspension), so nothing that happens while the record is read or while the
        caller handles it is missed."""
        while True:
            waiter = asyncio.ensure_future(self.sync.wait_for_change(request_id, timeout))
            try:
                await asyncio.sleep(0)  # let the waiter register
                yield await self.get_with_position(request_id, with_logs=with_logs)
                await waiter
            finally:
                waiter.cancel()

    def close(self) -> None:
        """Stop the threads (the wrapped queue is closed by whoever opened it)."""
        self._threads.close()
