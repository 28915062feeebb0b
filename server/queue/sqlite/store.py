"""Connections to the SQLite queue file and the row-level steps its operations share.

Durability comes from SQLite in WAL mode (`synchronous=NORMAL`: a commit survives a crash of
any process; only a power cut can lose the last few). Speed comes from short transactions,
one connection per thread (Python caches each connection's prepared statements), a
process-wide write lock (threads of one process never spin in SQLite's busy handler), and
datagram wake-ups (server/queue/notify.py) instead of polling.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.jobs import Job, JobError, JobRecord, JobResult, LogEntry, Status, start_timeout_error
from server.queue.notify import Notifier
from server.queue.records import JobCache, utc_timestamp, with_inputs
from server.queue.sqlite.schema import migrate, open_connection
from server.queue.usage import usage_of, utc_day

# Notifier key the API is woken with whenever a webhook delivery becomes due.
DELIVERIES_KEY = "deliveries"
WORKERS_KEY = "workers"

# What a status poll reads: never the input images (see server/queue/records.py).
RECORD_COLUMNS = (
    "id, status, job_json, created_at, started_at, completed_at, attempts, worker, "
    "cancel_requested, progress, result_json, error_json"
)


class SQLiteStore:
    """One process's handle on the database file: its connections, its write lock, its
    wake-up socket, and the row helpers used inside transactions."""

    def __init__(self, db_path: Path, run_dir: Path, *, role: str, lease_seconds: float = 30.0) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._jobs = JobCache()
        with self._write_lock:
            migrate(self._conn())
        self.notifier = Notifier(run_dir, role)

    # --- connections ---------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        """A new connection to the same database (for tools and tests); the caller closes it."""
        return open_connection(self.db_path)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = open_connection(self.db_path)
            self._local.conn = conn
            with self._connections_lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # A COMMIT that fails (SQLITE_FULL: the disk is full) may leave the transaction
                # open; rolled back here, or the next commit on this connection would store
                # what the caller was just told had failed.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _execute_write(self, sql: str, params: tuple = ()) -> int:
        """One statement in its own (implicit) transaction; returns the changed row count."""
        with self._write_lock:
            return self._conn().execute(sql, params).rowcount

    def close(self) -> None:
        self.notifier.close()
        with self._connections_lock:
            for conn in self._connections:
                # One made in another thread refuses; it closes when that thread's objects go.
                with contextlib.suppress(sqlite3.ProgrammingError):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    # --- rows ----------------------------------------------------------------------------
    def _record(self, row: tuple, logs: list[LogEntry], job: Job | None = None) -> JobRecord:
        """A record from RECORD_COLUMNS; `job` (the claimed job with its inputs) replaces the
        cached one."""
        (rid, status, job_json, created, started, completed, attempts, worker, cancel, progress,
         result_json, error_json) = row  # fmt: skip
        return JobRecord(
            id=rid,
            job=job if job is not None else self._jobs.job(rid, job_json),
            status=Status(status),
            created_at=created,
            started_at=started,
            completed_at=completed,
            attempts=attempts,
            worker=worker,
            cancel_requested=bool(cancel),
            progress=progress,
            logs=logs,
            result=JobResult.model_validate_json(result_json) if result_json else None,
            error=JobError.model_validate_json(error_json) if error_json else None,
        )

    @staticmethod
    def _claimed_job(conn: sqlite3.Connection, request_id: str, job_json: str) -> Job:
        """The job with its input images, for the worker that claimed it. A job queued before
        the inputs table existed has its image in the jobs row (its mask in the JSON)."""
        image, mask, reference_image = conn.execute(
            "SELECT COALESCE(i.image, j.image), i.mask, i.reference_image FROM jobs j "
            "LEFT JOIN job_inputs i ON i.request_id = j.id WHERE j.id = ?",
            (request_id,),
        ).fetchone()
        return with_inputs(Job.model_validate_json(job_json), image, mask, reference_image)

    @staticmethod
    def _logs(conn: sqlite3.Connection, request_id: str) -> list[LogEntry]:
        rows = conn.execute(
            "SELECT ts, level, source, message FROM logs WHERE request_id = ? ORDER BY id", (request_id,)
        ).fetchall()
        return [
            LogEntry(timestamp=ts, level=level, source=source, message=message)
            for ts, level, source, message in rows
        ]

    @staticmethod
    def _add_log(conn: sqlite3.Connection, request_id: str, message: str, now: float) -> None:
        conn.execute(
            "INSERT INTO logs (request_id, ts, level, source, message) VALUES (?, ?, 'INFO', 'USER', ?)",
            (request_id, utc_timestamp(now), message),
        )

    @staticmethod
    def _finish(
        conn: sqlite3.Connection,
        request_id: str,
        now: float,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        condition: str = "status != 'COMPLETED'",
        params: tuple = (),
    ) -> bool:
        """Mark a job COMPLETED (if `condition` holds), add it to its tenant's usage and queue
        its webhook delivery in the same transaction."""
        cursor = conn.execute(
            "UPDATE jobs SET status = 'COMPLETED', completed_at = ?, lease_expires = NULL, "
            f"result_json = ?, error_json = ?, progress = ? WHERE id = ? AND {condition}",
            (
                now,
                result.model_dump_json() if result is not None else None,
                error.model_dump_json() if error is not None else None,
                1.0 if result is not None else 0.0,
                request_id,
                *params,
            ),
        )
        if cursor.rowcount != 1:
            return False
        used = usage_of(result, error)
        conn.execute(
            "INSERT INTO tenant_usage (day, tenant, app_id, requests, failed, images, pixels, gpu_seconds) "
            "SELECT ?, COALESCE(tenant, ''), app_id, 1, ?, ?, ?, ? FROM jobs WHERE id = ? "
            "ON CONFLICT (day, tenant, app_id) DO UPDATE SET requests = requests + 1, "
            "failed = failed + excluded.failed, images = images + excluded.images, "
            "pixels = pixels + excluded.pixels, gpu_seconds = gpu_seconds + excluded.gpu_seconds",
            (utc_day(now), used.failed, used.images, used.pixels, used.gpu_seconds, request_id),
        )
        # No worker runs a completed job again: its input images go now, not at purge.
        conn.execute("DELETE FROM job_inputs WHERE request_id = ?", (request_id,))
        conn.execute(
            "INSERT OR IGNORE INTO deliveries (request_id, due_at) SELECT id, ? FROM jobs "
            "WHERE id = ? AND webhook = 1",
            (now, request_id),
        )
        return True

    def _expire_deadlines(self, conn: sqlite3.Connection, now: float) -> list[str]:
        """Fail queued jobs whose start deadline passed: they must never start late."""
        ids = [
            rid
            for (rid,) in conn.execute(
                "SELECT id FROM jobs WHERE status = 'IN_QUEUE' AND start_deadline IS NOT NULL "
                "AND start_deadline < ?",
                (now,),
            )
        ]
        for rid in ids:
            self._finish(conn, rid, now, error=start_timeout_error())
        return ids

    def _notify_api(self, request_ids: list[str], *, delivery: bool = True) -> None:
        if request_ids:
            keys = [*request_ids, DELIVERIES_KEY] if delivery else request_ids
            self.notifier.notify("api", "\n".join(keys).encode())
