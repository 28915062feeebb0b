"""The queue contract shared by the SQLite backend (one box) and a Redis backend (many boxes).

States: IN_QUEUE -> IN_PROGRESS -> COMPLETED. COMPLETED carries a result or an error
(cancellation and timeouts included); no other state exists, because fal's clients reject any
other status string.

The API process calls the producer side; a worker process calls the consumer side. Both sides
may live in different processes, so every method reads and writes the shared store, and change
notifications travel between processes (never a sleep-polling loop as the main path).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum

from server.jobs import Job, JobError, JobRecord, JobResult


class CancelOutcome(str, Enum):
    CANCELLED = "CANCELLED"  # was queued: completed at once as cancelled
    REQUESTED = "REQUESTED"  # is running: the worker stops at its next denoising step
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    NOT_FOUND = "NOT_FOUND"


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    state: str  # "loading", "warming", "ready", "failed", "stopped"
    device: str
    model: str
    detail: str
    pid: int
    updated_at: float


class JobQueue(ABC):
    # --- producer side (API process) -----------------------------------------------------
    @abstractmethod
    def submit(self, job: Job, request_id: str | None = None) -> JobRecord:
        """Store a job durably (committed before this returns) and wake a waiting worker."""

    def submit_with_position(self, job: Job, request_id: str | None = None) -> tuple[JobRecord, int]:
        """`submit`, plus the number of jobs ahead of the new one (its queue position) as it
        was stored. A backend may override this to answer both in one step."""
        record = self.submit(job, request_id)
        return record, self.position(record.id) or 0

    def submit_many(self, jobs: list[Job]) -> list[tuple[JobRecord, int]]:
        """Several `submit_with_position`s, in order; a backend may store them in one step
        (see server/queue/batch.py)."""
        return [self.submit_with_position(job) for job in jobs]

    @abstractmethod
    def get(self, request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        """The record; `with_logs=False` leaves `logs` empty (cheaper, for status polls)."""

    @abstractmethod
    def position(self, request_id: str) -> int | None:
        """Jobs ahead of this one (normal priority before low, then FIFO); None if not queued."""

    @abstractmethod
    def depth(self) -> int:
        """Number of queued jobs."""

    @abstractmethod
    def cancel(self, request_id: str) -> CancelOutcome: ...

    @abstractmethod
    async def wait_for_change(self, request_id: str, timeout: float) -> None:
        """Return when the request may have changed (status, log, progress) or after timeout."""

    # --- consumer side (worker process) --------------------------------------------------
    @abstractmethod
    def claim(self, worker_id: str, timeout: float) -> JobRecord | None:
        """Atomically take the next job and a lease on it, waiting up to `timeout` seconds."""

    @abstractmethod
    def renew(self, request_id: str, worker_id: str) -> bool:
        """Extend the lease; False if the worker no longer holds it."""

    @abstractmethod
    def is_cancel_requested(self, request_id: str) -> bool: ...

    @abstractmethod
    def log(self, request_id: str, message: str, progress: float | None = None) -> None:
        """Append a timestamped log line (and optionally the progress, 0..1) and notify."""

    @abstractmethod
    def complete(self, request_id: str, worker_id: str, result: JobResult) -> bool: ...

    @abstractmethod
    def fail(self, request_id: str, worker_id: str | None, error: JobError) -> bool: ...

    # --- maintenance (supervisor / API background task) ----------------------------------
    @abstractmethod
    def recover_expired(self) -> list[str]:
        """Jobs whose lease ran out go back to the head of the queue once, then fail with
        error_type runner_disconnected; queued jobs past their start deadline fail with
        request_timeout. Returns the affected ids."""

    @abstractmethod
    def release_worker(self, worker_id: str) -> list[str]:
        """A worker is known dead: treat its leases as expired now."""

    @abstractmethod
    def purge(self, older_than: float) -> list[JobRecord]:
        """Delete completed records finished before `older_than` (unix time); return them so
        that their files can be deleted too."""

    # --- worker registry (for /health) ---------------------------------------------------
    @abstractmethod
    def set_worker_state(
        self, worker_id: str, state: str, *, device: str, model: str, detail: str = ""
    ) -> None: ...

    @abstractmethod
    def workers(self) -> list[WorkerInfo]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and sockets."""
