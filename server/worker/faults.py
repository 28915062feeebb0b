"""What went wrong, and what the worker does about it.

- A queue outage (`QueueUnavailable`; on SQLite a locked, unreadable or full database) is
  waited out with backoff (server/worker/retry.py): it never fails a job.
- A storage error (`OSError` while writing an output) fails that job with an error that
  says why (a full disk has its own message) and the worker keeps serving.
- A GPU out-of-memory frees the cache and retries the job one image at a time
  (server/worker/generation.py), else fails it naming the size.
- A GPU error that leaves the CUDA context unusable (a "sticky" error) requeues the job
  without counting the attempt and ends the process with EXIT_DEVICE_LOST, so that the
  supervisor starts one with a fresh context. A job that already cost one worker its device
  is failed instead, so a poison job cannot restart the workers forever.
- `max_consecutive_failures` internal failures in a row stop the worker (EXIT_FAILING) before
  it drains the whole queue into failures.
"""

from __future__ import annotations

import sqlite3
import threading
from enum import Enum

from server.disk import OUTPUT_NOT_STORED_MESSAGE, is_disk_full
from server.jobs import JobError, JobRecord
from server.queue.base import QueueUnavailable
from server.worker.request import internal_error

# sqlite3.OperationalError messages that mean "not now" rather than a bug in a statement.
_SQLITE_TRANSIENT = ("locked", "busy", "disk i/o error", "unable to open", "disk is full")

# CUDA errors after which the context is unusable: every later call fails the same way.
_DEVICE_LOST = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "ecc error",
    "busy or unavailable",
    "illegal instruction",
    "misaligned address",
    "hardware stack error",
    "invalid program counter",
    "launch timed out",
    "cuda driver error",
    "device not ready",
    "gpu has fallen off the bus",
)

# The log line of a job requeued because its worker lost the device; seen again, the job fails.
DEVICE_LOST_REQUEUED = "The GPU failed while running this request; requeued for a fresh worker"


# Reasons a database gives that waiting will not fix: the configuration is wrong.
_MISCONFIGURED = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "permission denied",
)


def queue_misconfigured(reason: str) -> bool:
    """Whether a `QueueUnavailable` message names a configuration error (a wrong password, a
    missing database) rather than a database that is away for now."""
    return any(marker in reason for marker in _MISCONFIGURED)


def is_queue_outage(exc: BaseException) -> bool:
    """The queue cannot be reached right now (wait and retry); anything else is a bug or a
    configuration error."""
    if isinstance(exc, QueueUnavailable):
        return not queue_misconfigured(str(exc))
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(marker in text for marker in _SQLITE_TRANSIENT)
    return False


class GpuFault(Enum):
    OUT_OF_MEMORY = "out of memory"
    DEVICE_LOST = "device lost"


def gpu_fault(exc: BaseException) -> GpuFault | None:
    """An out-of-memory or a sticky CUDA error, here or in what caused it; else None."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).lower()
        if type(seen).__name__ == "OutOfMemoryError" or "out of memory" in text:
            return GpuFault.OUT_OF_MEMORY
        about_cuda = "cuda" in text or "cudnn" in text or "cublas" in text
        if isinstance(seen, RuntimeError) and about_cuda and any(m in text for m in _DEVICE_LOST):
            return GpuFault.DEVICE_LOST
        seen = seen.__cause__ or seen.__context__
    return None


class GpuOutOfMemory(Exception):
    """Generating the job ran out of GPU memory, also one image at a time."""

    def __init__(self, width: int, height: int, num_images: int) -> None:
        size = f"{width}x{height}"
        what = (
            f"{num_images} images of {size}, also one at a time" if num_images > 1 else f"an image of {size}"
        )
        super().__init__(f"the GPU ran out of memory generating {what}; try a smaller size")


def storage_error(exc: OSError) -> JobError:
    """A job whose output could not be written: say why, without the server's paths."""
    if is_disk_full(exc):
        return internal_error(OUTPUT_NOT_STORED_MESSAGE, status_code=507)
    reason = exc.strerror or type(exc).__name__
    return internal_error(f"the output could not be stored: {reason}")


def device_lost_before(record: JobRecord) -> bool:
    """Whether this job was requeued once already because a worker lost its GPU on it."""
    return any(entry.message.startswith(DEVICE_LOST_REQUEUED) for entry in record.logs)


class FailureStreak:
    """Internal failures in a row (any success resets it). `limit` of them trip it; 0 never."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()
        self.tripped = threading.Event()
        self.last_error = ""

    def failed(self, message: str) -> None:
        with self._lock:
            self._count += 1
            self.last_error = message
            if self.limit and self._count >= self.limit:
                self.tripped.set()

    def succeeded(self) -> None:
        with self._lock:
            self._count = 0

    @property
    def count(self) -> int:
        return self._count
