"""Group commit for the API process: the submits that arrive together share one commit.

Every request handler runs on the event loop, so a burst of submits reaches the queue one
after another, each paying a commit of its own. `SubmitBatcher.submit` instead parks the job
and awaits it; the first job of a loop turn schedules one flush for the next turn, which
stores every job parked meanwhile in one transaction (`JobQueue.submit_many`). Each caller
resumes only after that commit, so a response never announces a job that is not durable.
An idle server flushes a lone submit on the very next loop turn: no timer, no added wait.
"""

from __future__ import annotations

import asyncio

from server.jobs import Job, JobRecord
from server.queue.base import JobQueue

# Most jobs one commit carries: bigger batches save little more and hold back early responses.
MAX_BATCH = 64


class SubmitBatcher:
    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._pending: list[tuple[Job, asyncio.Future[tuple[JobRecord, int]]]] = []

    async def submit(self, job: Job) -> tuple[JobRecord, int]:
        """Store `job` durably; returns its record and queue position."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[JobRecord, int]] = loop.create_future()
        self._pending.append((job, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        elif len(self._pending) >= MAX_BATCH:
            self._flush()  # answer the first ones now rather than after the whole burst is read
        return await future

    def _flush(self) -> None:
        batch = [(job, future) for job, future in self._pending if not future.cancelled()]
        self._pending = []
        if not batch:
            return
        try:
            stored = self.queue.submit_many([job for job, _ in batch])
        except Exception as exc:  # every caller of this batch gets the error (a 500)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, stored, strict=True):
            if not future.done():
                future.set_result(result)
