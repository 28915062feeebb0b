"""Two watchers of the held jobs, each its own thread.

The heartbeat renews the lease of every held job every lease/3 seconds. A renewal that is
refused means the job belongs to someone else now: it is marked `lease_lost` and abandoned at
its next step. A queue outage is retried with backoff (at most every lease/3): the API does
not expire leases until one lease after the queue is back (server/api/maintenance.py), so the
first renewal after an outage keeps every job of a live worker.

The watchdog ends a worker whose held job made no progress (no step, no stage change) for
`watchdog_seconds` in a stage where the worker itself must progress (server/worker/held.py):
a hung GPU kernel or driver would otherwise hide behind a heartbeat that keeps renewing. It
stops renewing that job and exits with EXIT_HUNG; the supervisor releases the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from server.queue.base import JobQueue
from server.worker.faults import is_queue_outage
from server.worker.held import HeldJob, HeldJobs
from server.worker.retry import Backoff, QueueOutage

logger = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self, queue: JobQueue, worker_id: str, held: HeldJobs, outage: QueueOutage, lease_seconds: float
    ) -> None:
        self.queue, self.worker_id, self.held, self.outage = queue, worker_id, held, outage
        self.interval = max(lease_seconds / 3, 0.05)
        self.stop = threading.Event()

    def run(self) -> None:
        backoff = Backoff()
        delay = self.interval
        while not self.stop.wait(delay):
            try:
                self.renew_all()
            except Exception as exc:
                if not is_queue_outage(exc):
                    raise
                self.outage.failed(exc, "renewing leases")
                delay = min(backoff.next_delay(), self.interval)
                continue
            backoff.reset()
            delay = self.interval

    def renew_all(self) -> None:
        jobs = self.held.renewable()
        for job in jobs:
            if not self.queue.renew(job.id, self.worker_id):
                job.lease_lost = True
                logger.warning("job %s: lease lost (the queue gave it to another worker)", job.id)
        if jobs:
            self.outage.succeeded()


class Watchdog:
    def __init__(
        self, held: HeldJobs, limit_seconds: float, on_hung: Callable[[HeldJob, float], None]
    ) -> None:
        self.held, self.limit, self.on_hung = held, limit_seconds, on_hung
        self.interval = min(max(limit_seconds / 10, 0.05), 5.0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            job, stalled = self.check(time.monotonic())
            if job is not None:
                job.hung = True  # the heartbeat stops renewing it from now on
                self.on_hung(job, stalled)
                return

    def check(self, now: float) -> tuple[HeldJob | None, float]:
        """The first held job stalled beyond the limit, and for how long."""
        for job in self.held.snapshot():
            stalled = job.stalled_for(now)
            if stalled is not None and stalled > self.limit:
                return job, stalled
        return None, 0.0
