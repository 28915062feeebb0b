"""The API process's queue upkeep: requeue or fail jobs whose lease or start deadline ran out
(workers that died, hung, or ran on other machines), delete results past retention and
expired uploads, and delete generated images that no record references (`OrphanSweep`).

Every queue call runs in a thread, never on the event loop. The once-a-second recovery pass
is a read when nothing is due (the queue takes no write lock then), so several API processes
may all run it. The purge deletes in bounded batches, each its own short transaction, and
removes the files of each batch in a thread too.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from server import lifecycle
from server.config import Settings
from server.jobs import JobRecord
from server.queue.base import PURGE_BATCH, JobQueue, QueueUnavailable
from server.storage import Storage

log = logging.getLogger("flux_server.api")

RECOVER_INTERVAL = 1.0  # seconds between lease/deadline checks
# Orphaned images: a file younger than this may belong to a job being completed right now.
ORPHAN_MIN_AGE = 3600.0
ORPHAN_SWEEP_INTERVAL = 600.0
# Files and records are timed by different clocks (boxes sharing the files directory).
CLOCK_SKEW_MARGIN = 600.0


def purge_interval(retention_seconds: float) -> float:
    """Sweep for expired results a few times per retention period, at most once a second."""
    return min(max(retention_seconds / 4, RECOVER_INTERVAL), 300.0)


def delete_files(storage: Storage, records: list[JobRecord]) -> None:
    """Delete the stored images of purged records (inline images have no file)."""
    for record in records:
        for image in record.result.images if record.result else []:
            if image.file_name:
                storage.delete(image.file_name)


async def purge_expired(
    queue: JobQueue, storage: Storage, older_than: float, batch: int = PURGE_BATCH
) -> int:
    """Delete results finished before `older_than` and their files, `batch` at a time;
    returns the count. Between batches the loop is free for requests."""
    purged = 0
    while True:
        records = await asyncio.to_thread(queue.purge, older_than, batch)
        if records:
            await asyncio.to_thread(delete_files, storage, records)
            purged += len(records)
        if len(records) < batch:
            return purged


class OrphanSweep:
    """Deletes generated images that no record references: a worker that crashed (or lost its
    job) between storing the images and completing the job leaves them behind.

    Cheap because it is incremental: a file is checked once, when it turns `min_age` old. One
    referenced then stays referenced until the purge deletes it with its record, and one
    referenced by nothing is deleted. Its record, if any, completed after the file was
    written, so one read of the results completed since the oldest new file settles them all.
    The first sweep of a process checks every file once (what crashes left before a restart).
    Uploads (with metadata) and files younger than `min_age` are never touched."""

    def __init__(self, queue: JobQueue, storage: Storage, min_age: float = ORPHAN_MIN_AGE) -> None:
        self.queue = queue
        self.storage = storage
        self.min_age = min_age
        self.checked_before = float("-inf")  # files written up to this time have been checked

    def run(self, now: float | None = None) -> int:
        """One sweep (blocking: call it in a thread); returns how many files it deleted."""
        cutoff = (time.time() if now is None else now) - self.min_age
        images = self.storage.generated_images(self.checked_before, cutoff)
        deleted = 0
        if images:
            referenced = self.queue.result_file_names(min(images.values()) - CLOCK_SKEW_MARGIN)
            for name in images.keys() - referenced:
                self.storage.delete(name)
                deleted += 1
        self.checked_before = cutoff
        return deleted


def record_recovered(queue: JobQueue, request_ids: list[str]) -> None:
    """A metric and a log line for each request the upkeep requeued or failed (rare)."""
    for request_id in request_ids:
        record = queue.get(request_id, with_logs=False)
        if record is not None:
            lifecycle.recovered(record)


class OutageGrace:
    """No lease is expired until one lease after the queue came back from an outage.

    While the queue was unreachable no worker could renew its leases, so right after the
    outage every lease looks expired: expiring them at once would requeue (and run twice) the
    jobs of workers that are alive and about to renew. During the outage and the grace that
    follows, a cheap probe replaces the recovery pass."""

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._down = False
        self._recover_from = 0.0  # monotonic time from which leases may be expired again

    def recovery_allowed(self) -> bool:
        return not self._down and time.monotonic() >= self._recover_from

    def unreachable(self, exc: Exception) -> None:
        if not self._down:
            log.warning("queue maintenance paused: %s", exc)
        self._down = True

    def reachable(self) -> None:
        if self._down:
            self._down = False
            self._recover_from = time.monotonic() + self.lease_seconds
            log.warning("the queue is back; expiring leases again in %.0f s", self.lease_seconds)


async def recover_and_purge(queue: JobQueue, storage: Storage, settings: Settings, *, purge: bool) -> None:
    """One upkeep pass: expired leases and start deadlines, then (when `purge`) old results."""
    recovered = await asyncio.to_thread(queue.recover_expired)
    if recovered:
        log.warning("requeued or failed (lost lease or start deadline): %s", ", ".join(recovered))
        await asyncio.to_thread(record_recovered, queue, recovered)
    if not purge:
        return
    purged = await purge_expired(queue, storage, time.time() - settings.retention_seconds)
    if purged:
        log.info("deleted %d result(s) older than %.0f s", purged, settings.retention_seconds)
    # Uploads expire on their own clocks; an expired one is already no longer served.
    uploads = await asyncio.to_thread(storage.purge_uploads)
    if uploads:
        log.info("deleted %d expired or abandoned upload(s)", uploads)


async def maintain_queue(queue: JobQueue, storage: Storage, settings: Settings) -> None:
    """Run until cancelled (a background task of the API's lifespan)."""
    next_purge = next_orphan_sweep = time.monotonic()
    orphans = OrphanSweep(queue, storage)
    grace = OutageGrace(settings.lease_seconds)
    while True:
        try:
            if grace.recovery_allowed():
                purge = time.monotonic() >= next_purge
                if purge:
                    next_purge = time.monotonic() + purge_interval(settings.retention_seconds)
                await recover_and_purge(queue, storage, settings, purge=purge)
                if time.monotonic() >= next_orphan_sweep:
                    next_orphan_sweep = time.monotonic() + ORPHAN_SWEEP_INTERVAL
                    deleted = await asyncio.to_thread(orphans.run)
                    if deleted:
                        log.warning("deleted %d generated image(s) that no request references", deleted)
            else:
                await asyncio.to_thread(queue.depth)  # a probe: is the queue back?
                grace.reachable()
        except (QueueUnavailable, sqlite3.OperationalError) as exc:
            grace.unreachable(exc)
        except Exception:
            log.exception("queue maintenance failed; retrying")
        await asyncio.sleep(RECOVER_INTERVAL)
