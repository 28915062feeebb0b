"""The shared queue: one PostgreSQL database used by the API and worker processes of every box.

Ordering: `priority_rank` (0 normal, 1 low) then `seq` from a sequence; a job put back takes
its `seq` from a second sequence counting down from 0, so it goes to the head. Claims take the
head with `FOR UPDATE SKIP LOCKED` in one short transaction: workers on many boxes never wait
for each other and never take the same job. Pool, transactions and row steps are in
store.py, the tables in schema.py, webhook deliveries in deliveries.py, wake-ups in wakeups.py.
"""

from __future__ import annotations

import os
import threading
import time

import psycopg

from server.jobs import (
    Job,
    JobError,
    JobRecord,
    JobResult,
    Status,
    cancelled_error,
    disconnected_error,
    new_request_id,
)
from server.queue.base import (
    MAX_ATTEMPTS,
    PURGE_BATCH,
    CancelOutcome,
    ClaimPreference,
    Heartbeats,
    JobQueue,
    WorkerInfo,
)
from server.queue.postgres.deliveries import PostgresDeliveries
from server.queue.postgres.schema import PURGE_LOCK
from server.queue.postgres.store import DB_NOW, RECORD_COLUMNS
from server.queue.postgres.wakeups import SUBMIT_KEY, WORKERS_KEY
from server.queue.records import PRIORITY_RANK, without_image

# A lost notification (a dropped listening connection) costs at most this long.
FALLBACK_POLL_SECONDS = 2.0
CHANGE_FALLBACK_SECONDS = 1.0

_REQUEUE = (
    "status = 'IN_QUEUE', worker = NULL, lease_expires = NULL, progress = 0, start_deadline = NULL, "
    "seq = nextval('flux_jobs_head_seq')"
)


class PostgresQueue(PostgresDeliveries, JobQueue):
    def __init__(self, url: str, *, role: str, lease_seconds: float = 30.0) -> None:
        super().__init__(url, role=role, lease_seconds=lease_seconds)
        self._interrupted = threading.Event()
        self._heartbeats = Heartbeats(lease_seconds)

    # --- producer side -------------------------------------------------------------------
    def submit(self, job: Job, request_id: str | None = None) -> JobRecord:
        return self._store([(job, request_id or new_request_id())])[0][0]

    def submit_with_position(self, job: Job, request_id: str | None = None) -> tuple[JobRecord, int]:
        return self._store([(job, request_id or new_request_id())])[0]

    def submit_many(self, jobs: list[Job]) -> list[tuple[JobRecord, int]]:
        return self._store([(job, new_request_id()) for job in jobs])

    def _store(self, entries: list[tuple[Job, str]]) -> list[tuple[JobRecord, int]]:
        """Insert the jobs in order in one transaction; each with its position."""
        now = time.time()
        bare_jobs = [without_image(job) for job, _ in entries]
        rows = [
            (request_id, job.app_id, PRIORITY_RANK[job.priority], bare.model_dump_json(), job.image, now,
             job.start_deadline, job.webhook is not None)
            for (job, request_id), bare in zip(entries, bare_jobs, strict=True)
        ]  # fmt: skip

        def store(conn: psycopg.Connection) -> list[int]:
            # Queued jobs of each class and the ones before it: one count per batch.
            normal, everything = conn.execute(
                "SELECT count(*) FILTER (WHERE priority_rank = 0), count(*) FROM flux_jobs "
                "WHERE status = 'IN_QUEUE'"
            ).fetchone()
            ahead = [int(normal), int(everything)]
            positions = []
            for row in rows:
                rank = row[2]
                positions.append(ahead[rank])
                for later in range(rank, len(ahead)):
                    ahead[later] += 1
            with conn.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO flux_jobs (id, app_id, status, priority_rank, job_json, image, created_at, "
                    "start_deadline, webhook) VALUES (%s, %s, 'IN_QUEUE', %s, %s, %s, %s, %s, %s)",
                    rows,
                )
            self._notify(conn, [SUBMIT_KEY])
            return positions

        positions = self._tx(store)
        for (_, request_id), bare in zip(entries, bare_jobs, strict=True):
            self._jobs.put(request_id, bare)
        return [
            (JobRecord(id=request_id, job=job, status=Status.IN_QUEUE, created_at=now), position)
            for (job, request_id), position in zip(entries, positions, strict=True)
        ]

    def get(self, request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        def read(conn: psycopg.Connection) -> JobRecord | None:
            row = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM flux_jobs WHERE id = %s", (request_id,)
            ).fetchone()
            if row is None:
                return None
            return self._record(row, self._logs(conn, request_id) if with_logs else [])

        return self._tx(read)

    def position(self, request_id: str) -> int | None:
        # One range count over the queue index: the cost grows with the position, not with
        # the length of the queue.
        row = self._tx(
            lambda conn: conn.execute(
                "SELECT j.status, (SELECT count(*) FROM flux_jobs q WHERE q.status = 'IN_QUEUE' "
                "AND (q.priority_rank, q.seq) < (j.priority_rank, j.seq)) FROM flux_jobs j WHERE j.id = %s",
                (request_id,),
            ).fetchone()
        )
        if row is None or row[0] != Status.IN_QUEUE.value:
            return None
        return int(row[1])

    def depth(self) -> int:
        row = self._tx(
            lambda conn: conn.execute("SELECT count(*) FROM flux_jobs WHERE status = 'IN_QUEUE'").fetchone()
        )
        return int(row[0]) if row else 0

    def cancel(self, request_id: str) -> CancelOutcome:
        def cancel(conn: psycopg.Connection) -> CancelOutcome:
            row = conn.execute(
                "SELECT status FROM flux_jobs WHERE id = %s FOR UPDATE", (request_id,)
            ).fetchone()
            if row is None:
                return CancelOutcome.NOT_FOUND
            if row[0] == Status.COMPLETED.value:
                return CancelOutcome.ALREADY_COMPLETED
            if row[0] == Status.IN_QUEUE.value:
                self._finish(conn, request_id, time.time(), error=cancelled_error())
                return CancelOutcome.CANCELLED
            conn.execute("UPDATE flux_jobs SET cancel_requested = TRUE WHERE id = %s", (request_id,))
            self._notify(conn, [request_id])
            return CancelOutcome.REQUESTED

        return self._tx(cancel)

    async def wait_for_change(self, request_id: str, timeout: float) -> None:
        await self.wakeups.wait_for(request_id, min(timeout, CHANGE_FALLBACK_SECONDS))

    # --- consumer side -------------------------------------------------------------------
    def claim(
        self, worker_id: str, timeout: float, prefer: ClaimPreference | None = None
    ) -> JobRecord | None:
        deadline = time.monotonic() + timeout
        if timeout > 0:
            self.wakeups.start()
        while True:
            if self._interrupted.is_set():
                self._interrupted.clear()
                return None
            generation = self.wakeups.submit_generation()
            record = self._claim_head(worker_id, prefer)
            if record is not None:
                return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.wakeups.wait_for_submit(generation, min(remaining, FALLBACK_POLL_SECONDS))

    def interrupt_claim(self) -> None:
        self._interrupted.set()
        self.wakeups.bump_submits()

    def _claim_head(self, worker_id: str, prefer: ClaimPreference | None = None) -> JobRecord | None:
        heartbeat = self._heartbeats.due(worker_id)

        def claim(conn: psycopg.Connection) -> JobRecord | None:
            now = time.time()
            if heartbeat:
                self._touch_worker(conn, worker_id)
            self._expire_deadlines(conn, now)
            if prefer is None:
                row = conn.execute(
                    "WITH head AS (SELECT id FROM flux_jobs WHERE status = 'IN_QUEUE' "
                    "ORDER BY priority_rank, seq LIMIT 1 FOR UPDATE SKIP LOCKED) "
                    "UPDATE flux_jobs j SET status = 'IN_PROGRESS', worker = %s, "
                    f"lease_expires = {DB_NOW} + %s, "
                    "attempts = attempts + 1, started_at = %s FROM head WHERE j.id = head.id "
                    f"RETURNING {', '.join('j.' + c for c in RECORD_COLUMNS.split(', '))}",
                    (worker_id, self.lease_seconds, now),
                ).fetchone()
            else:
                row = self._claim_preferred(conn, worker_id, prefer, now)
            if row is None:
                return None
            request_id = row[0]
            self._add_log(conn, request_id, f"Started on {worker_id}", now)
            self._notify(conn, [request_id])
            return self._record(row, self._logs(conn, request_id))

        try:
            return self._tx(claim)
        except Exception:
            if self._patience > 0:  # a worker waits for the database to come back
                time.sleep(FALLBACK_POLL_SECONDS)
                return None
            raise

    def _claim_preferred(
        self, conn: psycopg.Connection, worker_id: str, prefer: ClaimPreference, now: float
    ) -> tuple | None:
        """Lock the first `window` queued jobs (other workers skip them), claim the one
        `prefer` chooses (ClaimPreference.choose)."""
        rows = conn.execute(
            "SELECT id, priority_rank, created_at, job_json FROM flux_jobs WHERE status = 'IN_QUEUE' "
            "ORDER BY priority_rank, seq LIMIT %s FOR UPDATE SKIP LOCKED",
            (prefer.window,),
        ).fetchall()
        if not rows:
            return None
        return conn.execute(
            f"UPDATE flux_jobs SET status = 'IN_PROGRESS', worker = %s, lease_expires = {DB_NOW} + %s, "
            f"attempts = attempts + 1, started_at = %s WHERE id = %s RETURNING {RECORD_COLUMNS}",
            (worker_id, self.lease_seconds, now, prefer.choose(rows, now)),
        ).fetchone()

    @staticmethod
    def _touch_worker(conn: psycopg.Connection, worker_id: str) -> None:
        conn.execute(f"UPDATE flux_workers SET updated_at = {DB_NOW} WHERE worker_id = %s", (worker_id,))

    def renew(self, request_id: str, worker_id: str) -> bool:
        heartbeat = self._heartbeats.due(worker_id)

        def renew(conn: psycopg.Connection) -> bool:
            if heartbeat:
                self._touch_worker(conn, worker_id)
            row = conn.execute(
                f"UPDATE flux_jobs SET lease_expires = {DB_NOW} + %s WHERE id = %s AND worker = %s "
                "AND status = 'IN_PROGRESS' RETURNING 1",
                (self.lease_seconds, request_id, worker_id),
            ).fetchone()
            return row is not None

        return self._tx(renew)

    def is_cancel_requested(self, request_id: str) -> bool:
        row = self._tx(
            lambda conn: conn.execute(
                "SELECT cancel_requested FROM flux_jobs WHERE id = %s", (request_id,)
            ).fetchone()
        )
        return bool(row and row[0])

    def log(self, request_id: str, message: str, progress: float | None = None) -> None:
        def log(conn: psycopg.Connection) -> None:
            self._add_log(conn, request_id, message, time.time())
            if progress is not None:
                conn.execute("UPDATE flux_jobs SET progress = %s WHERE id = %s", (progress, request_id))
            self._notify(conn, [request_id])

        self._tx(log)

    def complete(self, request_id: str, worker_id: str, result: JobResult) -> bool:
        return self._tx(
            lambda conn: self._finish(
                conn,
                request_id,
                time.time(),
                result=result,
                condition="status = 'IN_PROGRESS' AND worker = %s",
                params=(worker_id,),
            )
        )

    def fail(self, request_id: str, worker_id: str | None, error: JobError) -> bool:
        if worker_id is None:
            return self._tx(lambda conn: self._finish(conn, request_id, time.time(), error=error))
        return self._tx(
            lambda conn: self._finish(
                conn,
                request_id,
                time.time(),
                error=error,
                condition="status = 'IN_PROGRESS' AND worker = %s",
                params=(worker_id,),
            )
        )

    def requeue(self, request_id: str, worker_id: str, message: str = "Worker stopping; requeued") -> bool:
        def requeue(conn: psycopg.Connection) -> bool:
            row = conn.execute(
                f"UPDATE flux_jobs SET {_REQUEUE}, attempts = GREATEST(attempts - 1, 0) "
                "WHERE id = %s AND worker = %s AND status = 'IN_PROGRESS' RETURNING 1",
                (request_id, worker_id),
            ).fetchone()
            if row is None:
                return False
            self._add_log(conn, request_id, message, time.time())
            self._notify(conn, [request_id, SUBMIT_KEY])
            return True

        return self._tx(requeue)

    # --- maintenance ---------------------------------------------------------------------
    def recover_expired(self) -> list[str]:
        due = self._tx(
            lambda conn: conn.execute(
                "SELECT EXISTS (SELECT 1 FROM flux_jobs WHERE status = 'IN_PROGRESS' "
                f"AND lease_expires < {DB_NOW}) OR EXISTS (SELECT 1 FROM flux_jobs WHERE status = 'IN_QUEUE' "
                f"AND start_deadline IS NOT NULL AND start_deadline < {DB_NOW})"
            ).fetchone()
        )
        if not due or not due[0]:
            return []
        return self._recover(f"lease_expires < {DB_NOW}", (), deadlines=True)

    def release_worker(self, worker_id: str) -> list[str]:
        return self._recover("worker = %s", (worker_id,), deadlines=False)

    def _recover(self, condition: str, params: tuple, *, deadlines: bool) -> list[str]:
        def recover(conn: psycopg.Connection) -> list[str]:
            now = time.time()
            rows = conn.execute(
                "SELECT id, attempts, cancel_requested FROM flux_jobs "
                f"WHERE status = 'IN_PROGRESS' AND {condition} FOR UPDATE SKIP LOCKED",
                params,
            ).fetchall()
            requeued: list[str] = []
            finished: list[str] = []
            for request_id, attempts, cancel_requested in rows:
                if cancel_requested:
                    self._finish(conn, request_id, now, error=cancelled_error())
                    finished.append(request_id)
                elif attempts < MAX_ATTEMPTS:
                    conn.execute(f"UPDATE flux_jobs SET {_REQUEUE} WHERE id = %s", (request_id,))
                    self._add_log(conn, request_id, "Worker lost; retrying", now)
                    requeued.append(request_id)
                else:
                    self._finish(conn, request_id, now, error=disconnected_error())
                    finished.append(request_id)
            if deadlines:
                finished += self._expire_deadlines(conn, now)
            if requeued:
                self._notify(conn, [*requeued, SUBMIT_KEY])
            return requeued + finished

        return self._tx(recover)

    def purge(self, older_than: float, limit: int = PURGE_BATCH) -> list[JobRecord]:
        def purge(conn: psycopg.Connection) -> list[tuple]:
            # One purger at a time across every box; the others find nothing to do.
            (locked,) = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PURGE_LOCK,)).fetchone()
            if not locked:
                return []
            rows = conn.execute(
                "DELETE FROM flux_jobs WHERE id IN (SELECT id FROM flux_jobs WHERE status = 'COMPLETED' "
                "AND completed_at < %s ORDER BY completed_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                f"RETURNING {RECORD_COLUMNS}",
                (older_than, limit),
            ).fetchall()
            ids = [row[0] for row in rows]
            if ids:
                conn.execute("DELETE FROM flux_logs WHERE request_id = ANY(%s)", (ids,))
                conn.execute("DELETE FROM flux_deliveries WHERE request_id = ANY(%s)", (ids,))
            return rows

        records = [self._record(row, []) for row in self._tx(purge)]
        for record in records:
            self._jobs.forget(record.id)
        return records

    # --- worker registry -----------------------------------------------------------------
    def set_worker_state(
        self, worker_id: str, state: str, *, device: str, model: str, detail: str = ""
    ) -> None:
        def upsert(conn: psycopg.Connection) -> None:
            conn.execute(
                "INSERT INTO flux_workers (worker_id, state, device, model, detail, pid, updated_at) "
                f"VALUES (%s, %s, %s, %s, %s, %s, {DB_NOW}) ON CONFLICT (worker_id) DO UPDATE SET "
                "state = EXCLUDED.state, device = EXCLUDED.device, model = EXCLUDED.model, "
                "detail = EXCLUDED.detail, pid = EXCLUDED.pid, updated_at = EXCLUDED.updated_at",
                (worker_id, state, device, model, detail, os.getpid()),
            )
            self._notify(conn, [WORKERS_KEY])

        self._tx(upsert)

    def remove_worker(self, worker_id: str) -> None:
        def remove(conn: psycopg.Connection) -> None:
            conn.execute("DELETE FROM flux_workers WHERE worker_id = %s", (worker_id,))
            self._notify(conn, [WORKERS_KEY])

        self._tx(remove)

    def workers(self) -> list[WorkerInfo]:
        rows = self._tx(
            lambda conn: conn.execute(
                "SELECT worker_id, state, device, model, detail, pid, updated_at FROM flux_workers "
                "ORDER BY worker_id"
            ).fetchall()
        )
        return [WorkerInfo(*row) for row in rows]
