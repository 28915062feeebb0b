"""The one place a held job ends: failed, requeued, completed or abandoned.

Each ending releases the job from `HeldJobs` (the heartbeat stops renewing its lease), records
its lifecycle event, and keeps the run of consecutive internal failures (`FailureStreak`)
that stops a worker from draining the queue into failures. Queue writes are retried until
the queue answers: a database outage delays an ending, never changes it.
"""

from __future__ import annotations

import logging
import threading

from server import lifecycle
from server.jobs import JobError
from server.queue.base import JobQueue
from server.worker.faults import FailureStreak
from server.worker.held import HeldJob, HeldJobs
from server.worker.retry import QueueOutage, until_back

logger = logging.getLogger(__name__)


class Outcomes:
    def __init__(
        self,
        queue: JobQueue,
        worker_id: str,
        held: HeldJobs,
        outage: QueueOutage,
        streak: FailureStreak,
        stopping: threading.Event,
    ) -> None:
        self.queue, self.worker_id, self.held = queue, worker_id, held
        self.outage, self.streak, self.stopping = outage, streak, stopping

    def fail(self, job: HeldJob, error: JobError, *, internal: bool, detail: str | None = None) -> None:
        """`internal`: the server's fault (counts toward the streak), not the request's.
        `detail`: what the operators see of it (the worker's state) when the client's message
        leaves it out (exception text)."""
        try:
            done = until_back(
                lambda: self.queue.fail(job.id, self.worker_id, error),
                doing=f"failing job {job.id}",
                outage=self.outage,
                stopping=self.stopping,
            )
        finally:
            self.held.release(job)
        if done:
            lifecycle.finished(job.record, error)
        if internal:
            self.streak.failed(detail or error.message)

    def requeue(self, job: HeldJob, message: str) -> bool:
        """Back to the head of the queue without counting the attempt."""
        try:
            return until_back(
                lambda: self.queue.requeue(job.id, self.worker_id, message),
                doing=f"requeueing job {job.id}",
                outage=self.outage,
                stopping=self.stopping,
            )
        finally:
            self.held.release(job)

    def completed(self, job: HeldJob) -> None:
        """The finisher stored and completed it (lifecycle recorded by the finisher)."""
        self.held.release(job)
        self.streak.succeeded()

    def abandon(self, job: HeldJob, why: str) -> None:
        """Not ours any more (lease lost): nothing to write."""
        self.held.release(job)
        logger.warning("job %s: %s; abandoned", job.id, why)
