"""One process's handle on the PostgreSQL queue: its pool, its wake-ups, transactions that
turn an unreachable server into `QueueUnavailable`, and the row steps operations share.

Times that several boxes compare (leases, start deadlines) use the database server's clock,
so that clock skew between boxes cannot expire a live lease.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from server.jobs import Job, JobError, JobRecord, JobResult, LogEntry, Status, start_timeout_error
from server.queue.fairshare import requeue_tag_sql
from server.queue.postgres.connection import connect, open_pool, unavailable
from server.queue.postgres.schema import migrate
from server.queue.postgres.wakeups import CHANNEL, DELIVERIES_KEY, Wakeups
from server.queue.records import JobCache, utc_timestamp
from server.queue.usage import usage_of, utc_day

T = TypeVar("T")

# The database server's clock, as unix time.
DB_NOW = "extract(epoch from clock_timestamp())::double precision"
# What a status poll reads: never the input images (see server/queue/records.py).
RECORD_COLUMNS = (
    "id, status, job_json, created_at, started_at, completed_at, attempts, worker, "
    "cancel_requested, progress, result_json, error_json"
)
# Puts a job back at the head of its class: the smallest fair tag (server/queue/fairshare.py)
# and its seq from the sequence that counts down.
REQUEUE = (
    "status = 'IN_QUEUE', worker = NULL, lease_expires = NULL, progress = 0, start_deadline = NULL, "
    f"{requeue_tag_sql('flux_jobs', 'LEAST')}, seq = nextval('flux_jobs_head_seq')"
)
# How long an API request waits for a connection before it answers 503.
CHECKOUT_TIMEOUT_SECONDS = 1.5


class _BrokenConnection(Exception):
    """A pooled connection turned out dead on first use."""


class PostgresStore:
    def __init__(self, url: str, *, role: str, lease_seconds: float = 30.0) -> None:
        self.url = url
        self.role = role
        self.lease_seconds = lease_seconds
        with connect(url) as conn:  # a clear error now, not a hung pool later
            migrate(conn)
        self._pool = open_pool(url, max_size=4 if role == "worker" else 10)
        self.wakeups = Wakeups(url)
        self._jobs = JobCache()

    def close(self) -> None:
        self.wakeups.close()
        self._pool.close()

    # --- transactions --------------------------------------------------------------------
    def _tx(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run `work` in one transaction (committed when it returns)."""
        return self._with_connection(work, transaction=True)

    def _run(self, work: Callable[[psycopg.Connection], T]) -> T:
        """Run `work` whose one statement is its own transaction (one round trip)."""
        return self._with_connection(work, transaction=False)

    def _with_connection(self, work: Callable[[psycopg.Connection], T], *, transaction: bool) -> T:
        """Every caller fails fast with QueueUnavailable: the API answers 503 at once, and a
        worker waits out the outage itself, with backoff, where it can afford to (server/worker:
        a progress write that blocked here would stall the device). A statement whose outcome
        is unknown (a lost COMMIT acknowledgement) raises too: callers retry idempotent work."""
        swept = False
        while True:
            try:
                with self._pool.connection(timeout=CHECKOUT_TIMEOUT_SECONDS) as conn:
                    try:
                        if not transaction:
                            return work(conn)
                        with conn.transaction():
                            return work(conn)
                    except (psycopg.OperationalError, psycopg.InterfaceError):
                        if conn.broken and not swept:
                            raise _BrokenConnection from None
                        raise
            except _BrokenConnection:
                # The server restarted since this connection was last used (its statements
                # never ran): drop every such connection, then try once more at once.
                swept = True
                self._pool.check()
            except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
                raise unavailable(self.url, exc) from exc

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
            cancel_requested=cancel,
            progress=progress,
            logs=logs,
            result=JobResult.model_validate_json(result_json) if result_json else None,
            error=JobError.model_validate_json(error_json) if error_json else None,
        )

    @staticmethod
    def _add_log(conn: psycopg.Connection, request_id: str, message: str, now: float) -> None:
        conn.execute(
            "INSERT INTO flux_logs (request_id, ts, level, source, message) "
            "VALUES (%s, %s, 'INFO', 'USER', %s)",
            (request_id, utc_timestamp(now), message),
        )

    @staticmethod
    def _notify(conn: psycopg.Connection, keys: Iterable[str]) -> None:
        """Sent when the transaction commits, to every listening process on every box."""
        payload = "\n".join(keys)
        if payload:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    def _finish(
        self,
        conn: psycopg.Connection,
        request_id: str,
        now: float,
        *,
        result: JobResult | None = None,
        error: JobError | None = None,
        condition: str = "status != 'COMPLETED'",
        params: tuple = (),
    ) -> bool:
        """Mark a job COMPLETED (if `condition` holds), delete its input images, write its
        webhook delivery row, add it to its tenant's usage and notify its waiters: one
        statement, so atomic also outside a transaction."""
        used = usage_of(result, error)
        row = conn.execute(
            "WITH done AS (UPDATE flux_jobs SET status = 'COMPLETED', completed_at = %s, "
            "lease_expires = NULL, result_json = %s, error_json = %s, progress = %s "
            f"WHERE id = %s AND {condition} RETURNING id, webhook, tenant, app_id), "
            # No worker runs a completed job again: its input images go now, not at purge.
            "inputs AS (DELETE FROM flux_job_inputs WHERE request_id IN (SELECT id FROM done)), "
            "delivery AS (INSERT INTO flux_deliveries (request_id, due_at) SELECT id, %s FROM done "
            "WHERE webhook ON CONFLICT DO NOTHING), "
            "used AS (INSERT INTO flux_usage (day, tenant, app_id, requests, failed, images, pixels, "
            "gpu_seconds) SELECT %s, COALESCE(tenant, ''), app_id, 1, %s, %s, %s, %s FROM done "
            "ON CONFLICT (day, tenant, app_id) DO UPDATE SET requests = flux_usage.requests + 1, "
            "failed = flux_usage.failed + EXCLUDED.failed, images = flux_usage.images + EXCLUDED.images, "
            "pixels = flux_usage.pixels + EXCLUDED.pixels, "
            "gpu_seconds = flux_usage.gpu_seconds + EXCLUDED.gpu_seconds) "
            "SELECT pg_notify(%s, CASE WHEN webhook THEN id || E'\\n' || %s ELSE id END) FROM done",
            (
                now,
                result.model_dump_json() if result is not None else None,
                error.model_dump_json() if error is not None else None,
                1.0 if result is not None else 0.0,
                request_id,
                *params,
                now,
                utc_day(now),
                used.failed,
                used.images,
                used.pixels,
                used.gpu_seconds,
                CHANNEL,
                DELIVERIES_KEY,
            ),
        ).fetchone()
        return row is not None

    def _expire_deadlines(self, conn: psycopg.Connection, now: float) -> list[str]:
        """Fail queued jobs whose start deadline passed: they must never start late."""
        rows = conn.execute(
            "SELECT id FROM flux_jobs WHERE status = 'IN_QUEUE' AND start_deadline IS NOT NULL "
            f"AND start_deadline < {DB_NOW} FOR UPDATE SKIP LOCKED"
        ).fetchall()
        for (rid,) in rows:
            self._finish(conn, rid, now, error=start_timeout_error())
        return [rid for (rid,) in rows]
