"""What the supervisor tells the queue, kept until the queue has taken it.

The supervisor must outlive the outside world: a PostgreSQL failover, a locked or full SQLite
file. So it never calls the queue where a failure would propagate; it records what it must
write (the jobs of an exited worker to release, a worker's row to update), and `flush` writes
it, then again on every turn of its loop (at most every RETRY_SECONDS while the queue fails)
until it works. A worker started again meanwhile releases its predecessor's jobs itself, and the
pending release is dropped: its successor has the same worker id, and a late release would take
the successor's job away.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from server.config import Settings
from server.queue.base import JobQueue

logger = logging.getLogger("flux_server.supervisor")

RETRY_SECONDS = 2.0  # between tries while the queue fails (each may block ~1.5 s on PostgreSQL)
NEXT_TRY = "; next try at "  # joins a load failure's reason and when the worker is tried again


@dataclass(frozen=True)
class RowWrite:
    """A worker row to write. For a load failure (`keep_worker_reason`), the worker's own
    reason in its "failed" row (e.g. the missing file, the out-of-memory) replaces `detail`'s
    generic one, and `note` (when the next try is) is added after it."""

    state: str
    device: str
    detail: str
    note: str = ""
    keep_worker_reason: bool = False


class QueueWrites:
    def __init__(
        self, settings: Settings, planned: Collection[str], open_queue: Callable[[], JobQueue] | None = None
    ) -> None:
        from server.queue.factory import open_queue as open_from_settings

        self.settings = settings
        self._planned = set(planned)
        self._open = open_queue or (lambda: open_from_settings(settings, role="supervisor"))
        self._queue: JobQueue | None = None
        self._releases: list[str] = []  # worker ids whose jobs must go back to the queue
        self._rows: dict[str, RowWrite] = {}  # the latest row to write per worker id
        self._retry_at = 0.0  # monotonic time of the next try while the queue fails
        self._failing_since: float | None = None

    # --- what to write ----------------------------------------------------------------
    def release(self, worker_id: str) -> None:
        """The worker's process is gone: its leased jobs go back to the queue (at the next
        `flush`)."""
        if worker_id not in self._releases:
            self._releases.append(worker_id)

    def set_row(self, worker_id: str, row: RowWrite) -> None:
        self._rows[worker_id] = row

    def forget_row(self, worker_id: str) -> None:
        """A new process of this worker reports its own state: an older write must not
        overwrite it."""
        self._rows.pop(worker_id, None)

    def pending_release(self, worker_id: str) -> bool:
        """Whether the jobs of this worker's last process are still to be released here."""
        return worker_id in self._releases

    def hand_over_release(self, worker_id: str) -> None:
        """A new process of this worker starts: it releases its predecessor's jobs itself
        before its first claim (server/worker/loop.py), so a release still pending here must
        not run later, when it would take the successor's own job away."""
        if worker_id in self._releases:
            self._releases.remove(worker_id)

    @property
    def pending(self) -> bool:
        return bool(self._releases or self._rows) or self._queue is None

    # --- writing ----------------------------------------------------------------------
    def flush(self, *, now: bool = False) -> bool:
        """Write what is pending; True when nothing is left. Never raises: a failure is
        logged (once per outage) and tried again on a later call."""
        if not self.pending:
            return True
        if not now and time.monotonic() < self._retry_at:
            return False
        try:
            queue = self._queue or self._open_and_clean()
            while self._releases:
                worker_id = self._releases[0]
                released = queue.release_worker(worker_id)
                self._releases.pop(0)
                if released:
                    logger.warning("%s held %s; released for retry", worker_id, ", ".join(released))
            while self._rows:
                worker_id, row = next(iter(self._rows.items()))
                self._write_row(queue, worker_id, row)
                if self._rows.get(worker_id) is row:
                    del self._rows[worker_id]
        except Exception as exc:  # QueueUnavailable, a full or locked SQLite file, ...
            self._retry_at = time.monotonic() + RETRY_SECONDS
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                logger.error(
                    "the queue cannot be written (%s); keeping %s for later",
                    exc,
                    self._describe_pending(),
                )
            return False
        if self._failing_since is not None:
            logger.info(
                "the queue is back after %.0f s; the supervisor's writes are done",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        return True

    def _open_and_clean(self) -> JobQueue:
        queue = self._open()
        # Rows left by an earlier run with more workers would keep /health degraded forever.
        # With a shared queue, only this box's rows are ours to clean up.
        own = f"{self.settings.box}-" if self.settings.shared_queue else ""
        try:
            for worker in queue.workers():
                stale = worker.state in ("stopped", "failed") and worker.worker_id.startswith(own)
                if worker.worker_id not in self._planned and stale:
                    queue.remove_worker(worker.worker_id)
        except BaseException:
            queue.close()
            raise
        self._queue = queue
        return queue

    def _write_row(self, queue: JobQueue, worker_id: str, row: RowWrite) -> None:
        detail = row.detail
        if row.keep_worker_reason:
            current = next((w for w in queue.workers() if w.worker_id == worker_id), None)
            if current is not None and current.state == "failed" and current.detail:
                detail = current.detail.split(NEXT_TRY, 1)[0]
        if row.note:
            detail += NEXT_TRY + row.note
        queue.set_worker_state(
            worker_id, row.state, device=row.device, model=self.settings.model, detail=detail
        )

    def _describe_pending(self) -> str:
        parts = [f"the release of {', '.join(self._releases)}'s jobs"] if self._releases else []
        if self._rows:
            parts.append(f"the rows of {', '.join(self._rows)}")
        return " and ".join(parts) or "its start-up"

    def close(self) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None
