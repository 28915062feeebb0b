"""The embedded queue: one SQLite file shared by the API process and the worker processes.

Ordering: `priority_rank` (0 normal, 1 low), then `fair_tag` (fair share between tenants,
server/queue/fairshare.py), then `seq`, an INTEGER PRIMARY KEY that grows with every submit. A
job that goes back to the queue gets the smallest tag and a `seq` below every other one: the head.
Connections, transactions and the row helpers are in store.py, the tables in schema.py, the
webhook deliveries in deliveries.py, the reads in reads.py.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from server.jobs import (
    Job,
    JobError,
    JobRecord,
    JobResult,
    Status,
    cancelled_error,
    disconnected_error,
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
from server.queue.fairshare import BatchTags, known_sql, read_known, requeue_tag_sql, tag_step
from server.queue.idempotency import IdempotencyKey, Submitted
from server.queue.records import PRIORITY_RANK, file_names_in_results, input_row, without_inputs
from server.queue.sqlite.deliveries import SQLiteDeliveries
from server.queue.sqlite.reads import SQLiteReads
from server.queue.sqlite.store import RECORD_COLUMNS, WORKERS_KEY

# A lost datagram costs at most this long: every wait re-reads the database after it.
FALLBACK_POLL_SECONDS = 0.5
# Puts a job back at the head of its class (see server/queue/fairshare.py).
_REQUEUE = f"{requeue_tag_sql('jobs', 'MIN')}, seq = (SELECT MIN(seq) FROM jobs) - 1"
_KNOWN = known_sql("jobs", "?")


class SQLiteQueue(SQLiteReads, SQLiteDeliveries, JobQueue):
    def __init__(self, db_path: Path, run_dir: Path, *, role: str, lease_seconds: float = 30.0) -> None:
        super().__init__(db_path, run_dir, role=role, lease_seconds=lease_seconds)
        self._interrupted = threading.Event()  # set by `interrupt_claim`, cleared by `claim`
        self._heartbeats = Heartbeats(lease_seconds)

    # --- producer side -------------------------------------------------------------------
    def store(self, entries: list[tuple[Job, str]]) -> list[tuple[JobRecord, int]]:
        """Insert the jobs (their input images into job_inputs) in order in one transaction
        (one commit); each with its position. The records returned carry no image bytes."""
        now = time.time()
        with self._write() as conn:
            bare_jobs, positions = self._insert(conn, entries, now)
        return self._stored(entries, bare_jobs, positions, now)

    def store_once(self, job: Job, request_id: str, key: IdempotencyKey) -> Submitted:
        now = time.time()
        with self._write() as conn:
            # One write lock: no other submit of this key runs between the read and the insert.
            conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (now - key.window_seconds,))
            held = conn.execute(
                "SELECT k.request_id, k.body_hash, j.id IS NOT NULL FROM idempotency_keys k "
                "LEFT JOIN jobs j ON j.id = k.request_id WHERE k.tenant = ? AND k.key = ?",
                (key.tenant, key.key),
            ).fetchone()
            if held is None or not held[2]:  # new, or its job was purged: the key is free
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency_keys "
                    "(tenant, key, body_hash, request_id, created_at) VALUES (?, ?, ?, ?, ?)",
                    (key.tenant, key.key, key.body_hash, request_id, now),
                )
                bare_jobs, positions = self._insert(conn, [(job, request_id)], now)
        if held is not None and held[2]:
            repeat = self._repeat(held[0], held[1], key)
            return repeat if repeat is not None else self.store_once(job, request_id, key)
        ((record, position),) = self._stored([(job, request_id)], bare_jobs, positions, now)
        return Submitted(record, position, repeated=False)

    def _stored(
        self, entries: list[tuple[Job, str]], bare_jobs: list[Job], positions: list[int], now: float
    ) -> list[tuple[JobRecord, int]]:
        """After the commit: cache the jobs, wake the workers, the records to return."""
        for (_, request_id), bare in zip(entries, bare_jobs, strict=True):
            self._jobs.put(request_id, bare)
        self.notifier.notify("worker")
        return [
            (JobRecord(id=request_id, job=bare, status=Status.IN_QUEUE, created_at=now), position)
            for (_, request_id), bare, position in zip(entries, bare_jobs, positions, strict=True)
        ]

    def _insert(
        self, conn: sqlite3.Connection, entries: list[tuple[Job, str]], now: float
    ) -> tuple[list[Job], list[int]]:
        """Insert the jobs inside the caller's transaction: the bare jobs and their positions."""
        weights = self.tenant_weights
        bare_jobs = [without_inputs(job) for job, _ in entries]
        rows = [
            (request_id, job.app_id, PRIORITY_RANK[job.priority], bare.model_dump_json(), now,
             job.start_deadline, int(job.webhook is not None), job.tenant)
            for (job, request_id), bare in zip(entries, bare_jobs, strict=True)
        ]  # fmt: skip
        inputs = [(request_id, *row) for job, request_id in entries if (row := input_row(job)) is not None]
        positions = []
        known = read_known([(row[2], row[7]) for row in rows], lambda p: conn.execute(_KNOWN, p).fetchone())
        tags = BatchTags(known)
        for row in rows:
            rank, tenant = row[2], row[7]
            tag, at_tail = tags.next(rank, tenant, tag_step(weights, tenant))
            # Queued jobs of this class and the better ones, the new one not yet among them,
            # less those it goes before (a larger tag); none when it joins the tail.
            (ahead,) = conn.execute(
                "SELECT COALESCE(SUM(queued), 0) FROM queue_counts WHERE priority_rank <= ?", (rank,)
            ).fetchone()
            if not at_tail:
                (passed,) = conn.execute(
                    "SELECT COUNT(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority_rank = ? "
                    "AND fair_tag > ?",
                    (rank, tag),
                ).fetchone()
                ahead -= passed
            positions.append(int(ahead))
            conn.execute(
                "INSERT INTO jobs (id, app_id, status, priority_rank, job_json, created_at, "
                "start_deadline, webhook, tenant, fair_tag) "
                "VALUES (?, ?, 'IN_QUEUE', ?, ?, ?, ?, ?, ?, ?)",
                (*row, tag),
            )
        conn.executemany(
            "INSERT INTO job_inputs (request_id, image, mask, reference_image) VALUES (?, ?, ?, ?)",
            inputs,
        )
        return bare_jobs, positions

    def cancel(self, request_id: str) -> CancelOutcome:
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                return CancelOutcome.NOT_FOUND
            status = row[0]
            if status == Status.COMPLETED.value:
                return CancelOutcome.ALREADY_COMPLETED
            if status == Status.IN_QUEUE.value:
                self._finish(conn, request_id, now, error=cancelled_error())
                outcome = CancelOutcome.CANCELLED
            else:
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (request_id,))
                outcome = CancelOutcome.REQUESTED
        self._notify_api([request_id], delivery=outcome is CancelOutcome.CANCELLED)
        return outcome

    async def wait_for_change(self, request_id: str, timeout: float) -> None:
        await self.notifier.wait_for(request_id, min(timeout, FALLBACK_POLL_SECONDS))

    # --- consumer side -------------------------------------------------------------------
    def claim(
        self, worker_id: str, timeout: float, prefer: ClaimPreference | None = None
    ) -> JobRecord | None:
        self._heartbeat(worker_id)
        deadline = time.monotonic() + timeout
        conn = self._conn()
        while True:
            if self._interrupted.is_set():
                self._interrupted.clear()
                return None
            if conn.execute("SELECT 1 FROM jobs WHERE status = 'IN_QUEUE' LIMIT 1").fetchone():
                record = self._claim_head(worker_id, prefer)
                if record is not None:
                    return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.notifier.wait(min(remaining, FALLBACK_POLL_SECONDS))

    def interrupt_claim(self) -> None:
        self._interrupted.set()
        self.notifier.wake_self()

    def _claim_head(self, worker_id: str, prefer: ClaimPreference | None = None) -> JobRecord | None:
        now = time.time()
        with self._write() as conn:
            expired = self._expire_deadlines(conn, now)
            rows = conn.execute(
                "SELECT id, priority_rank, created_at, job_json FROM jobs WHERE status = 'IN_QUEUE' "
                "ORDER BY priority_rank, fair_tag, seq LIMIT ?",
                (prefer.window if prefer is not None else 1,),
            ).fetchall()
            request_id = None
            if rows:
                request_id = prefer.choose(rows, now) if prefer is not None else rows[0][0]
            if request_id is not None:
                conn.execute(
                    "UPDATE jobs SET status = 'IN_PROGRESS', worker = ?, lease_expires = ?, "
                    "attempts = attempts + 1, started_at = ? WHERE id = ?",
                    (worker_id, now + self.lease_seconds, now, request_id),
                )
                self._add_log(conn, request_id, f"Started on {worker_id}", now)
                record_row = conn.execute(
                    f"SELECT {RECORD_COLUMNS} FROM jobs WHERE id = ?", (request_id,)
                ).fetchone()
                job = self._claimed_job(conn, request_id, record_row[2])
        self._notify_api(expired)
        if request_id is None:
            return None
        self.notifier.notify("api", request_id.encode())
        return self._record(record_row, self._logs(self._conn(), request_id), job)

    def _heartbeat(self, worker_id: str) -> None:
        if self._heartbeats.due(worker_id):
            self._execute_write(
                "UPDATE workers SET updated_at = ? WHERE worker_id = ?", (time.time(), worker_id)
            )

    def renew(self, request_id: str, worker_id: str) -> bool:
        self._heartbeat(worker_id)
        changed = self._execute_write(
            "UPDATE jobs SET lease_expires = ? WHERE id = ? AND worker = ? AND status = 'IN_PROGRESS'",
            (time.time() + self.lease_seconds, request_id, worker_id),
        )
        return changed == 1

    def is_cancel_requested(self, request_id: str) -> bool:
        row = self._conn().execute("SELECT cancel_requested FROM jobs WHERE id = ?", (request_id,)).fetchone()
        return bool(row and row[0])

    def log(self, request_id: str, message: str, progress: float | None = None) -> None:
        now = time.time()
        with self._write() as conn:
            self._add_log(conn, request_id, message, now)
            if progress is not None:
                conn.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress, request_id))
        self.notifier.notify("api", request_id.encode())

    def complete(self, request_id: str, worker_id: str, result: JobResult) -> bool:
        with self._write() as conn:
            done = self._finish(
                conn,
                request_id,
                time.time(),
                result=result,
                condition="status = 'IN_PROGRESS' AND worker = ?",
                params=(worker_id,),
            )
            # A retry of a completion that was stored (see JobQueue.complete): still a yes.
            stored_before = not done and self._completed_with(conn, request_id, worker_id, result)
        if done:
            self._notify_api([request_id])
        return done or stored_before

    @staticmethod
    def _completed_with(conn: sqlite3.Connection, request_id: str, worker_id: str, result: JobResult) -> bool:
        row = conn.execute(
            "SELECT 1 FROM jobs WHERE id = ? AND status = 'COMPLETED' AND worker = ? AND result_json = ?",
            (request_id, worker_id, result.model_dump_json()),
        ).fetchone()
        return row is not None

    def fail(self, request_id: str, worker_id: str | None, error: JobError) -> bool:
        with self._write() as conn:
            if worker_id is None:
                done = self._finish(conn, request_id, time.time(), error=error)
            else:
                done = self._finish(
                    conn,
                    request_id,
                    time.time(),
                    error=error,
                    condition="status = 'IN_PROGRESS' AND worker = ?",
                    params=(worker_id,),
                )
        if done:
            self._notify_api([request_id])
        return done

    def requeue(self, request_id: str, worker_id: str, message: str = "Worker stopping; requeued") -> bool:
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = 'IN_QUEUE', worker = NULL, lease_expires = NULL, progress = 0, "
                f"attempts = MAX(attempts - 1, 0), start_deadline = NULL, {_REQUEUE} "
                "WHERE id = ? AND worker = ? AND status = 'IN_PROGRESS'",
                (request_id, worker_id),
            )
            if cursor.rowcount == 1:
                self._add_log(conn, request_id, message, time.time())
        if cursor.rowcount != 1:
            return False
        self.notifier.notify("worker")
        self._notify_api([request_id], delivery=False)
        return True

    # --- maintenance ---------------------------------------------------------------------
    def recover_expired(self) -> list[str]:
        now = time.time()
        # Two index probes; the write lock and transaction only when one of them finds a row.
        due = (
            self._conn()
            .execute(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'IN_PROGRESS' AND lease_expires < ?) "
                "OR EXISTS (SELECT 1 FROM jobs WHERE status = 'IN_QUEUE' AND start_deadline IS NOT NULL "
                "AND start_deadline < ?)",
                (now, now),
            )
            .fetchone()[0]
        )
        if not due:
            return []
        return self._recover("lease_expires < ?", (now,), now, deadlines=True)

    def release_worker(self, worker_id: str) -> list[str]:
        return self._recover("worker = ?", (worker_id,), time.time(), deadlines=False)

    def _recover(self, condition: str, params: tuple, now: float, *, deadlines: bool) -> list[str]:
        requeued: list[str] = []
        finished: list[str] = []
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id, attempts, cancel_requested FROM jobs "
                f"WHERE status = 'IN_PROGRESS' AND {condition}",
                params,
            ).fetchall()
            for request_id, attempts, cancel_requested in rows:
                if cancel_requested:
                    self._finish(conn, request_id, now, error=cancelled_error())
                    finished.append(request_id)
                elif attempts < MAX_ATTEMPTS:
                    conn.execute(
                        "UPDATE jobs SET status = 'IN_QUEUE', worker = NULL, lease_expires = NULL, "
                        f"progress = 0, start_deadline = NULL, {_REQUEUE} WHERE id = ?",
                        (request_id,),
                    )
                    self._add_log(conn, request_id, "Worker lost; retrying", now)
                    requeued.append(request_id)
                else:
                    self._finish(conn, request_id, now, error=disconnected_error())
                    finished.append(request_id)
            if deadlines:
                finished += self._expire_deadlines(conn, now)
        if requeued:
            self.notifier.notify("worker")
            self._notify_api(requeued, delivery=False)
        self._notify_api(finished)
        return requeued + finished

    def purge(self, older_than: float, limit: int = PURGE_BATCH) -> list[JobRecord]:
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM jobs WHERE status = 'COMPLETED' AND completed_at < ? "
                "ORDER BY completed_at LIMIT ?",
                (older_than, limit),
            ).fetchall()
            ids = [(row[0],) for row in rows]
            conn.executemany("DELETE FROM jobs WHERE id = ?", ids)
            conn.executemany("DELETE FROM logs WHERE request_id = ?", ids)
            conn.executemany("DELETE FROM deliveries WHERE request_id = ?", ids)
        records = [self._record(row, []) for row in rows]
        for record in records:
            self._jobs.forget(record.id)
        return records

    def result_file_names(self, completed_since: float) -> set[str]:
        rows = self._conn().execute(
            "SELECT result_json FROM jobs WHERE status = 'COMPLETED' AND completed_at >= ? "
            "AND result_json IS NOT NULL",
            (completed_since,),
        )
        return file_names_in_results(result_json for (result_json,) in rows)

    # --- worker registry -----------------------------------------------------------------
    def set_worker_state(
        self, worker_id: str, state: str, *, device: str, model: str, detail: str = ""
    ) -> None:
        self._execute_write(
            "INSERT OR REPLACE INTO workers (worker_id, state, device, model, detail, pid, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (worker_id, state, device, model, detail, os.getpid(), time.time()),
        )
        self.notifier.notify("api", WORKERS_KEY.encode())

    def remove_worker(self, worker_id: str) -> None:
        self._execute_write("DELETE FROM workers WHERE worker_id = ?", (worker_id,))
        self.notifier.notify("api", WORKERS_KEY.encode())

    def workers(self) -> list[WorkerInfo]:
        rows = (
            self._conn()
            .execute(
                "SELECT worker_id, state, device, model, detail, pid, updated_at "
                "FROM workers ORDER BY worker_id"
            )
            .fetchall()
        )
        return [WorkerInfo(*row) for row in rows]
