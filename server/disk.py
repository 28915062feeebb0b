"""A full disk: how to recognise one, and a free-space floor that refuses new work before it.

Every process that writes to the data or files directory may meet a full disk. `is_disk_full`
tells such an error apart from every other failure (an `OSError` with ENOSPC or EDQUOT,
SQLite's "database or disk is full", PostgreSQL's disk_full), so that the API answers 507
instead of 500 and the worker fails a job with a message that says why.

`FreeSpace` is the floor: below `min_free_bytes` on any watched filesystem the API refuses
submits and uploads (`DiskFull`, answered 507 by server/api/errors.py) while reads keep working,
and accepts them again by itself once space returns. It measures with `statvfs`, at most once
a `cache_seconds` per filesystem, so a flood of submits costs no system call per request.

A leaf module: it imports nothing from the server.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("flux_server.disk")

# What a client is told (never a path of the server's).
DISK_FULL_MESSAGE = "The server's disk is full; new requests and uploads are refused until space is freed"
# What a job whose output could not be written fails with (the worker's side).
OUTPUT_NOT_STORED_MESSAGE = "the server's disk is full; the output could not be stored"
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# PostgreSQL's SQLSTATE for disk_full (class 53, insufficient resources).
_PG_DISK_FULL = "53100"


class DiskFull(Exception):
    """New work cannot be stored: the disk is full or below the free-space floor."""

    def __init__(self, message: str = DISK_FULL_MESSAGE) -> None:
        super().__init__(message)


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, says the disk or quota is full."""
    seen = 0
    while exc is not None and seen < 8:  # the chain of causes; bounded against cycles
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
                return True
        if getattr(exc, "sqlstate", None) == _PG_DISK_FULL:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem holding `path`."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


class FreeSpace:
    """The free-space floor on the filesystems of `paths` (0 bytes: no floor)."""

    def __init__(
        self,
        paths: Iterable[Path],
        min_free_bytes: int,
        *,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = list(dict.fromkeys(Path(path) for path in paths))
        self.min_free_bytes = min_free_bytes
        self.cache_seconds = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._measured_at = float("-inf")
        self._short: Path | None = None  # a path below the floor at the last measurement

    def check(self) -> None:
        """Raise DiskFull when a watched filesystem is below the floor (measured at most once
        per `cache_seconds`)."""
        if self.min_free_bytes > 0 and self.below_floor() is not None:
            raise DiskFull()

    def below_floor(self) -> Path | None:
        """A watched path whose filesystem is below the floor, or None."""
        if self.min_free_bytes <= 0:
            return None
        now = self._clock()
        if now - self._measured_at < self.cache_seconds:
            return self._short
        with self._lock:
            if now - self._measured_at >= self.cache_seconds:  # not measured meanwhile
                self._short = self._measure()
                self._measured_at = now
            return self._short

    def _measure(self) -> Path | None:
        for path in self.paths:
            try:
                free = free_bytes(path)
            except OSError:
                continue  # not created yet, or unreadable: no reason to refuse work
            if free < self.min_free_bytes:
                if self._short is None:
                    log.warning(
                        "free space on %s is %d bytes, below the floor of %d (--min-free-disk-bytes): "
                        "refusing submits and uploads until space is freed",
                        path,
                        free,
                        self.min_free_bytes,
                    )
                return path
        if self._short is not None:
            log.warning("free space is above the floor again: accepting submits and uploads")
        return None
