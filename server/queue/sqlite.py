"""The embedded queue: one SQLite file shared by the API process and the worker processes.

Durability comes from SQLite in WAL mode (`synchronous=NORMAL`: a commit survives a crash of
any process; only a power cut can lose the last few). Speed comes from short transactions,
one connection per thread (Python caches each connection's prepared statements), a
process-wide write lock (threads of one process never spin in SQLite's busy handler), and
datagram wake-ups (server/queue/notify.py) instead of polling.

Ordering: `priority_rank` (0 normal, 1 low) then `seq`, an INTEGER PRIMARY KEY that grows with
every submit. A job that goes back to the queue gets a `seq` below every other one: the head.

Webhooks: whenever a job with a webhook completes (any path), the same transaction inserts a
row into `deliveries`; the dispatcher (server/webhooks.py) takes it from there, using
`SQLiteQueue.connect()` for its own connection and `wait_for_deliveries()` to sleep.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from server.jobs import (
    Job,
    JobError,
    JobRecord,
    JobResult,
    LogEntry,
    Status,
    cancelled_error,
    disconnected_error,
    new_request_id,
    start_timeout_error,
)
from server.queue.base import CancelOutcome, JobQueue, WorkerInfo
from server.queue.notify import Notifier

# A lost datagram costs at most this long: every wait re-reads the database after it.
FALLBACK_POLL_SECONDS = 0.5
# A job whose worker vanished is tried this many times in all before it fails.
MAX_ATTEMPTS = 2
# Notifier key the API is woken with whenever a webhook delivery becomes due.
DELIVERIES_KEY = "deliveries"
WORKERS_KEY = "workers"

PRIORITY_RANK = {"normal": 0, "low": 1}
_JOB_CACHE_SIZE = 4096

# One transaction: several processes may open a new database at once, and the counts table
# must be filled from the jobs already queued before its triggers start keeping it.
SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    status TEXT NOT NULL,
    priority_rank INTEGER NOT NULL,
    job_json TEXT NOT NULL,  -- the Job without its input image
    image BLOB,  -- the input image, kept out of the JSON (no base64, no parse on every read)
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_expires REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress REAL NOT NULL DEFAULT 0,
    result_json TEXT,
    error_json TEXT,
    start_deadline REAL,
    webhook INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority_rank, seq);
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs (start_deadline)
    WHERE status = 'IN_QUEUE' AND start_deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_completed ON jobs (completed_at) WHERE status = 'COMPLETED';
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    level TEXT NOT NULL,
    source TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_request ON logs (request_id, id);
CREATE TABLE IF NOT EXISTS deliveries (
    request_id TEXT PRIMARY KEY,
    due_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    delivered_at REAL,
    gave_up INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    detail TEXT NOT NULL,
    pid INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
-- Queued jobs per priority class, kept by the triggers below: a new job's queue position and
-- the queue depth are one small read however long the queue is. (A job's class never changes.)
CREATE TABLE IF NOT EXISTS queue_counts (
    priority_rank INTEGER PRIMARY KEY,
    queued INTEGER NOT NULL
);
INSERT OR IGNORE INTO queue_counts (priority_rank, queued)
    SELECT priority_rank, COUNT(*) FROM jobs WHERE status = 'IN_QUEUE' GROUP BY priority_rank;
CREATE TRIGGER IF NOT EXISTS queue_counts_submit AFTER INSERT ON jobs
WHEN NEW.status = 'IN_QUEUE' BEGIN
    INSERT INTO queue_counts (priority_rank, queued) VALUES (NEW.priority_rank, 1)
        ON CONFLICT (priority_rank) DO UPDATE SET queued = queued + 1;
END;
CREATE TRIGGER IF NOT EXISTS queue_counts_requeue AFTER UPDATE OF status ON jobs
WHEN OLD.status != 'IN_QUEUE' AND NEW.status = 'IN_QUEUE' BEGIN
    INSERT INTO queue_counts (priority_rank, queued) VALUES (NEW.priority_rank, 1)
        ON CONFLICT (priority_rank) DO UPDATE SET queued = queued + 1;
END;
CREATE TRIGGER IF NOT EXISTS queue_counts_leave AFTER UPDATE OF status ON jobs
WHEN OLD.status = 'IN_QUEUE' AND NEW.status != 'IN_QUEUE' BEGIN
    UPDATE queue_counts SET queued = queued - 1 WHERE priority_rank = OLD.priority_rank;
END;
CREATE TRIGGER IF NOT EXISTS queue_counts_delete AFTER DELETE ON jobs
WHEN OLD.status = 'IN_QUEUE' BEGIN
    UPDATE queue_counts SET queued = queued - 1 WHERE priority_rank = OLD.priority_rank;
END;
COMMIT;
"""

_RECORD_COLUMNS = (
    "id, status, job_json, image, created_at, started_at, completed_at, attempts, worker, "
    "cancel_requested, progress, result_json, error_json"
)


def utc_timestamp(now: float | None = None) -> str:
    """fal's log timestamp: naive UTC ISO with microseconds, e.g. 2024-12-20T15:37:17.120314."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")


def open_connection(db_path: Path) -> sqlite3.Connection:
    """A connection with the pragmas every user of the queue database needs. Autocommit mode:
    callers write `BEGIN IMMEDIATE` ... `COMMIT` around multi-statement changes."""
    conn = sqlite3.connect(str(db_path), timeout=30.0, isolation_level=None, cached_statements=256)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA temp_store = MEMORY")
    return conn


class SQLiteQueue(JobQueue):
    def __init__(self, db_path: Path, run_dir: Path, *, role: str, lease_seconds: float = 30.0) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_seconds = lease_seconds
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # image-less jobs: job_json never changes after submit
        conn = self._conn()
        conn.execute("PRAGMA journal_mode = WAL")
        with self._write_lock:
            conn.executescript(SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "image" not in columns:  # a database made before input images had their column
                conn.execute("ALTER TABLE jobs ADD COLUMN image BLOB")
        self.notifier = Notifier(run_dir, role)

    # --- connections ---------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        """A new connection to the same database (for the webhook dispatcher and tools);
        the caller owns and closes it."""
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
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        self.notifier.close()
        with self._connections_lock:
            for conn in self._connections:
                # One made in another thread refuses; it closes when that thread's objects go.
                with contextlib.suppress(sqlite3.ProgrammingError):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    # --- helpers -------------------------------------------------------------------------
    def _job(self, request_id: str, job_json: str, image: bytes | None) -> Job:
        job = self._jobs.get(request_id)
        if job is None:
            job = Job.model_validate_json(job_json)
            self._cache_job(request_id, job)
        return job if image is None else job.model_copy(update={"image": image})

    def _cache_job(self, request_id: str, job: Job) -> None:
        if len(self._jobs) >= _JOB_CACHE_SIZE:
            self._jobs.pop(next(iter(self._jobs)), None)
        self._jobs[request_id] = job

    def _record(self, row: tuple, logs: list[LogEntry]) -> JobRecord:
        (rid, status, job_json, image, created, started, completed, attempts, worker, cancel, progress,
         result_json, error_json) = row  # fmt: skip
        return JobRecord(
            id=rid,
            job=self._job(rid, job_json, image),
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

    def _logs(self, conn: sqlite3.Connection, request_id: str) -> list[LogEntry]:
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
        """Mark a job COMPLETED (if `condition` holds) and queue its webhook delivery in the
        same transaction."""
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

    # --- producer side -------------------------------------------------------------------
    def submit(self, job: Job, request_id: str | None = None) -> JobRecord:
        return self._store([(job, request_id or new_request_id())])[0][0]

    def submit_with_position(self, job: Job, request_id: str | None = None) -> tuple[JobRecord, int]:
        return self._store([(job, request_id or new_request_id())])[0]

    def submit_many(self, jobs: list[Job]) -> list[tuple[JobRecord, int]]:
        return self._store([(job, new_request_id()) for job in jobs])

    def _store(self, entries: list[tuple[Job, str]]) -> list[tuple[JobRecord, int]]:
        """Insert the jobs in order in one transaction (one commit); each with its position."""
        now = time.time()
        bare_jobs = [
            job.model_copy(update={"image": None}) if job.image is not None else job for job, _ in entries
        ]
        rows = [
            (request_id, job.app_id, PRIORITY_RANK[job.priority], bare.model_dump_json(), job.image, now,
             job.start_deadline, int(job.webhook is not None))
            for (job, request_id), bare in zip(entries, bare_jobs, strict=True)
        ]  # fmt: skip
        positions = []
        with self._write() as conn:
            for row in rows:
                # Queued jobs of this class and the ones before it, the new one not yet among them.
                (ahead,) = conn.execute(
                    "SELECT COALESCE(SUM(queued), 0) FROM queue_counts WHERE priority_rank <= ?", (row[2],)
                ).fetchone()
                positions.append(int(ahead))
                conn.execute(
                    "INSERT INTO jobs (id, app_id, status, priority_rank, job_json, image, created_at, "
                    "start_deadline, webhook) VALUES (?, ?, 'IN_QUEUE', ?, ?, ?, ?, ?, ?)",
                    row,
                )
        for (_, request_id), bare in zip(entries, bare_jobs, strict=True):
            self._cache_job(request_id, bare)
        self.notifier.notify("worker")
        return [
            (JobRecord(id=request_id, job=job, status=Status.IN_QUEUE, created_at=now), position)
            for (job, request_id), position in zip(entries, positions, strict=True)
        ]

    def get(self, request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        conn = self._conn()
        row = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        return self._record(row, self._logs(conn, request_id) if with_logs else [])

    def position(self, request_id: str) -> int | None:
        # The higher classes' counts, then one index range count of the earlier jobs in its
        # own class: the cost grows with the position in the class, not with the queue length.
        row = (
            self._conn()
            .execute(
                "SELECT j.status, "
                "(SELECT COALESCE(SUM(queued), 0) FROM queue_counts c "
                "WHERE c.priority_rank < j.priority_rank) + "
                "(SELECT COUNT(*) FROM jobs q WHERE q.status = 'IN_QUEUE' "
                "AND q.priority_rank = j.priority_rank AND q.seq < j.seq) "
                "FROM jobs j WHERE j.id = ?",
                (request_id,),
            )
            .fetchone()
        )
        if row is None or row[0] != Status.IN_QUEUE.value:
            return None
        return int(row[1])

    def depth(self) -> int:
        (count,) = self._conn().execute("SELECT COALESCE(SUM(queued), 0) FROM queue_counts").fetchone()
        return int(count)

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
        """Sleep until the request is notified, at most `timeout` (and at most the fallback
        poll). Read the record and call this without an `await` in between, or a change in
        that gap is seen only after the fallback poll."""
        await self.notifier.wait_for(request_id, min(timeout, FALLBACK_POLL_SECONDS))

    async def wait_for_deliveries(self, timeout: float) -> None:
        """For the webhook dispatcher: sleep until a delivery may have become due."""
        await self.notifier.wait_for(DELIVERIES_KEY, timeout)

    # --- consumer side -------------------------------------------------------------------
    def claim(self, worker_id: str, timeout: float) -> JobRecord | None:
        deadline = time.monotonic() + timeout
        conn = self._conn()
        while True:
            if conn.execute("SELECT 1 FROM jobs WHERE status = 'IN_QUEUE' LIMIT 1").fetchone():
                record = self._claim_head(worker_id)
                if record is not None:
                    return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.notifier.wait(min(remaining, FALLBACK_POLL_SECONDS))

    def _claim_head(self, worker_id: str) -> JobRecord | None:
        now = time.time()
        with self._write() as conn:
            expired = self._expire_deadlines(conn, now)
            row = conn.execute(
                "SELECT id FROM jobs WHERE status = 'IN_QUEUE' ORDER BY priority_rank, seq LIMIT 1"
            ).fetchone()
            if row is not None:
                request_id = row[0]
                conn.execute(
                    "UPDATE jobs SET status = 'IN_PROGRESS', worker = ?, lease_expires = ?, "
                    "attempts = attempts + 1, started_at = ? WHERE id = ?",
                    (worker_id, now + self.lease_seconds, now, request_id),
                )
                self._add_log(conn, request_id, f"Started on {worker_id}", now)
                record_row = conn.execute(
                    f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE id = ?", (request_id,)
                ).fetchone()
        self._notify_api(expired)
        if row is None:
            return None
        self.notifier.notify("api", request_id.encode())
        return self._record(record_row, self._logs(self._conn(), request_id))

    def renew(self, request_id: str, worker_id: str) -> bool:
        with self._write_lock:
            cursor = self._conn().execute(
                "UPDATE jobs SET lease_expires = ? WHERE id = ? AND worker = ? AND status = 'IN_PROGRESS'",
                (time.time() + self.lease_seconds, request_id, worker_id),
            )
        return cursor.rowcount == 1

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
        if done:
            self._notify_api([request_id])
        return done

    def fail(self, request_id: str, worker_id: str | None, error: JobError) -> bool:
        """Complete with `error`. A worker may fail only a job it holds; `worker_id=None`
        (the system) may fail any job that has not completed."""
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
        """Give a held job back to the head of the queue without counting the attempt (a
        worker shutting down cleanly)."""
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = 'IN_QUEUE', worker = NULL, lease_expires = NULL, progress = 0, "
                "attempts = MAX(attempts - 1, 0), start_deadline = NULL, "
                "seq = (SELECT MIN(seq) FROM jobs) - 1 "
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
                        "progress = 0, start_deadline = NULL, seq = (SELECT MIN(seq) FROM jobs) - 1 "
                        "WHERE id = ?",
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

    def purge(self, older_than: float) -> list[JobRecord]:
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM jobs WHERE status = 'COMPLETED' AND completed_at < ?",
                (older_than,),
            ).fetchall()
            records = [self._record(row, self._logs(conn, row[0])) for row in rows]
            for record in records:
                conn.execute("DELETE FROM jobs WHERE id = ?", (record.id,))
                conn.execute("DELETE FROM logs WHERE request_id = ?", (record.id,))
                conn.execute("DELETE FROM deliveries WHERE request_id = ?", (record.id,))
        for record in records:
            self._jobs.pop(record.id, None)
        return records

    # --- worker registry -----------------------------------------------------------------
    def set_worker_state(
        self, worker_id: str, state: str, *, device: str, model: str, detail: str = ""
    ) -> None:
        with self._write_lock:
            self._conn().execute(
                "INSERT OR REPLACE INTO workers (worker_id, state, device, model, detail, pid, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (worker_id, state, device, model, detail, os.getpid(), time.time()),
            )
        self.notifier.notify("api", WORKERS_KEY.encode())

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (the supervisor, after it has released the worker's jobs)."""
        with self._write_lock:
            self._conn().execute("DELETE FROM workers WHERE worker_id = ?", (worker_id,))
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
