"""Group commit for the API process: the submits that arrive together share one commit.

Every request handler runs on the event loop, so a burst of submits reaches the queue one
after another, each paying a commit of its own. `SubmitBatcher.submit` instead parks the job
and awaits it; the first job parked while no flush runs starts one, which stores up to
`MAX_BATCH` parked jobs in one transaction (`JobQueue.submit_many`) in a thread, off the
loop; jobs parked meanwhile go in the next commit. Each caller resumes only after its
commit, so a response never announces a job that is not durable. An idle server flushes a
lone submit on the very next loop turn: no timer, no added wait.
"""

from __future__ import annotations

import asyncio

from server.jobs import Job, JobRecord
from server.queue.base import JobQueue

# Most jobs one commit carries: bigger batches save little more and hold back early responses.
MAX_BATCH = 64

_Parked = tuple[Job, "asyncio.Future[tuple[JobRecord, int]]"]


class SubmitBatcher:
    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._pending: list[_Parked] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, job: Job) -> tuple[JobRecord, int]:
        """Store `job` durably; returns its record and queue position."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[JobRecord, int]] = loop.create_future()
        self._pending.append((job, future))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_all())
        return await future

    async def _flush_all(self) -> None:
        try:
            while self._pending:
                batch = [(job, future) for job, future in self._pending[:MAX_BATCH] if not future.cancelled()]
                del self._pending[:MAX_BATCH]
                if batch:
                    await self._flush(batch)
        finally:
            self._flusher = None

    async def _flush(self, batch: list[_Parked]) -> None:
        try:
            stored = await asyncio.to_thread(self.queue.submit_many, [job for job, _ in batch])
        except Exception as exc:  # every caller of this batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, stored, strict=True):
            if not future.done():
                future.set_result(result)
