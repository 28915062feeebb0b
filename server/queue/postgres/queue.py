"""The shared queue: one PostgreSQL database used by the API and worker processes of every box.

Ordering: `priority_rank` (0 normal, 1 low), then `fair_tag` (fair share between tenants,
server/queue/fairshare.py), then `seq` from a sequence; a job put back takes the smallest tag
and its `seq` from a second sequence counting down from 0, so it goes to the head. Claims take the
head with `FOR UPDATE SKIP LOCKED` in one short transaction: workers on many boxes never wait
for each other and never take the same job. Pool, transactions and row steps are in
store.py, the tables in schema.py, the reads in reads.py, webhook deliveries in deliveries.py,
recovery, purge and the worker registry in maintenance.py, wake-ups in wakeups.py.
"""

from __future__ import annotations

import threading
import time

import psycopg

from server.jobs import (
    Job,
    JobError,
    JobRecord,
    JobResult,
    LogEntry,
    Status,
    cancelled_error,
)
from server.queue.base import (
    CancelOutcome,
    ClaimPreference,
    Heartbeats,
    JobQueue,
)
from server.queue.fairshare import BatchTags, known_sql, read_known, tag_step
from server.queue.idempotency import IdempotencyKey, Submitted
from server.queue.postgres.deliveries import PostgresDeliveries
from server.queue.postgres.maintenance import PostgresMaintenance
from server.queue.postgres.reads import PostgresReads
from server.queue.postgres.store import DB_NOW, RECORD_COLUMNS, REQUEUE
from server.queue.postgres.wakeups import CHANNEL, SUBMIT_KEY
from server.queue.records import PRIORITY_RANK, input_row, utc_timestamp, with_inputs, without_inputs

# A lost notification (a dropped listening connection) costs at most this long.
FALLBACK_POLL_SECONDS = 2.0
CHANGE_FALLBACK_SECONDS = 1.0


_KNOWN = known_sql("flux_jobs", "%s")
# For each (priority_rank, tag): the queued jobs of the class a new job with that tag goes
# before (a range read of the index's tail).
_PASSED = (
    "SELECT (SELECT count(*) FROM flux_jobs WHERE status = 'IN_QUEUE' AND priority_rank = x.rank "
    "AND fair_tag > x.tag) FROM unnest(%s::smallint[], %s::float8[]) WITH ORDINALITY AS x(rank, tag, n) "
    "ORDER BY x.n"
)


class PostgresQueue(PostgresReads, PostgresMaintenance, PostgresDeliveries, JobQueue):
    def __init__(self, url: str, *, role: str, lease_seconds: float = 30.0) -> None:
        super().__init__(url, role=role, lease_seconds=lease_seconds)
        self._interrupted = threading.Event()
        self._heartbeats = Heartbeats(lease_seconds)

    # --- producer side -------------------------------------------------------------------
    def store(self, entries: list[tuple[Job, str]]) -> list[tuple[JobRecord, int]]:
        """Insert the jobs (their input images into flux_job_inputs) in order in one
        transaction; each with its position. The records returned carry no image bytes."""
        now = time.time()
        bare_jobs = [without_inputs(job) for job, _ in entries]
        positions = self._tx(lambda conn: self._insert(conn, entries, bare_jobs, now))
        return self._stored(entries, bare_jobs, positions, now)

    def store_once(self, job: Job, request_id: str, key: IdempotencyKey) -> Submitted:
        now = time.time()
        bare_jobs = [without_inputs(job)]

        def store(conn: psycopg.Connection) -> tuple[str, str] | list[int]:
            conn.execute(
                "DELETE FROM flux_idempotency_keys WHERE created_at < %s", (now - key.window_seconds,)
            )
            # A concurrent insert of the same key (another box) makes this one wait for its
            # commit, then do nothing: the row read next (a new snapshot) is that one.
            inserted = conn.execute(
                "INSERT INTO flux_idempotency_keys (tenant, key, body_hash, request_id, created_at) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant, key) DO NOTHING RETURNING 1",
                (key.tenant, key.key, key.body_hash, request_id, now),
            ).fetchone()
            if inserted is None:
                held = conn.execute(
                    "SELECT k.request_id, k.body_hash, EXISTS (SELECT 1 FROM flux_jobs j "
                    "WHERE j.id = k.request_id) FROM flux_idempotency_keys k "
                    "WHERE k.tenant = %s AND k.key = %s FOR UPDATE",
                    (key.tenant, key.key),
                ).fetchone()
                if held is not None and held[2]:
                    return held[0], held[1]
                conn.execute(  # its job was purged (or the row expired meanwhile): the key is free
                    "INSERT INTO flux_idempotency_keys (tenant, key, body_hash, request_id, created_at) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (tenant, key) DO UPDATE SET "
                    "body_hash = EXCLUDED.body_hash, request_id = EXCLUDED.request_id, "
                    "created_at = EXCLUDED.created_at",
                    (key.tenant, key.key, key.body_hash, request_id, now),
                )
            return self._insert(conn, [(job, request_id)], bare_jobs, now)

        outcome = self._tx(store)
        if isinstance(outcome, tuple):
            repeat = self._repeat(outcome[0], outcome[1], key)
            return repeat if repeat is not None else self.store_once(job, request_id, key)
        ((record, position),) = self._stored([(job, request_id)], bare_jobs, outcome, now)
        return Submitted(record, position, repeated=False)

    def _stored(
        self, entries: list[tuple[Job, str]], bare_jobs: list[Job], positions: list[int], now: float
    ) -> list[tuple[JobRecord, int]]:
        for (_, request_id), bare in zip(entries, bare_jobs, strict=True):
            self._jobs.put(request_id, bare)
        return [
            (JobRecord(id=request_id, job=bare, status=Status.IN_QUEUE, created_at=now), position)
            for (_, request_id), bare, position in zip(entries, bare_jobs, positions, strict=True)
        ]

    def _insert(
        self, conn: psycopg.Connection, entries: list[tuple[Job, str]], bare_jobs: list[Job], now: float
    ) -> list[int]:
        """Insert the jobs inside the caller's transaction; their positions."""
        weights = self.tenant_weights
        rows = [
            (request_id, job.app_id, PRIORITY_RANK[job.priority], bare.model_dump_json(), now,
             job.start_deadline, job.webhook is not None, job.tenant)
            for (job, request_id), bare in zip(entries, bare_jobs, strict=True)
        ]  # fmt: skip
        inputs = [(request_id, *row) for job, request_id in entries if (row := input_row(job)) is not None]
        # Queued jobs of each class and the ones before it: one count per batch.
        normal, everything = conn.execute(
            "SELECT count(*) FILTER (WHERE priority_rank = 0), count(*) FROM flux_jobs "
            "WHERE status = 'IN_QUEUE'"
        ).fetchone()
        ahead = [int(normal), int(everything)]
        known = read_known([(row[2], row[7]) for row in rows], lambda p: conn.execute(_KNOWN, p).fetchone())
        tags = BatchTags(known)
        placed = [tags.next(row[2], row[7], tag_step(weights, row[7])) for row in rows]
        row_tags = [tag for tag, _ in placed]
        ranks = [row[2] for row in rows]
        passed = [0] * len(rows)  # queued jobs each goes before: none at the tail of its class
        inside = [index for index, (_, at_tail) in enumerate(placed) if not at_tail]
        if inside:
            counts = conn.execute(_PASSED, ([ranks[i] for i in inside], [row_tags[i] for i in inside]))
            for index, (count,) in zip(inside, counts.fetchall(), strict=True):
                passed[index] = count
        positions = []
        stored: list[tuple[int, float]] = []  # the batch's jobs before this one
        for rank, tag, already_queued in zip(ranks, row_tags, passed, strict=True):
            # The jobs it goes before: those queued already, and the batch's earlier ones.
            earlier = sum(1 for r, t in stored if r == rank and t > tag)
            positions.append(ahead[rank] - already_queued - earlier)
            stored.append((rank, tag))
            for later in range(rank, len(ahead)):
                ahead[later] += 1
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO flux_jobs (id, app_id, status, priority_rank, job_json, created_at, "
                "start_deadline, webhook, tenant, fair_tag) "
                "VALUES (%s, %s, 'IN_QUEUE', %s, %s, %s, %s, %s, %s, %s)",
                [(*row, tag) for row, tag in zip(rows, row_tags, strict=True)],
            )
            if inputs:
                cursor.executemany(
                    "INSERT INTO flux_job_inputs (request_id, image, mask, reference_image) "
                    "VALUES (%s, %s, %s, %s)",
                    inputs,
                )
        self._notify(conn, [SUBMIT_KEY])
        return positions

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
            # The head (or, with a preference, the job it chooses among the first few, locked
            # while it looks), then claim it, log who took it and wake its waiters: one statement.
            head = (
                "SELECT id FROM flux_jobs WHERE status = 'IN_QUEUE' "
                "ORDER BY priority_rank, fair_tag, seq LIMIT 1 FOR UPDATE SKIP LOCKED"
            )
            head_params: tuple = ()
            if prefer is not None:
                rows = conn.execute(
                    "SELECT id, priority_rank, created_at, job_json FROM flux_jobs "
                    "WHERE status = 'IN_QUEUE' ORDER BY priority_rank, fair_tag, seq LIMIT %s "
                    "FOR UPDATE SKIP LOCKED",
                    (prefer.window,),
                ).fetchall()
                if not rows:
                    return None
                chosen = prefer.choose(rows, now)
                if chosen is None:  # none of them is a job this worker can take
                    return None
                head, head_params = "SELECT %s AS id", (chosen,)
            started = f"Started on {worker_id}"
            row = conn.execute(
                f"WITH head AS ({head}), "
                f"claimed AS (UPDATE flux_jobs j SET status = 'IN_PROGRESS', worker = %s, "
                f"lease_expires = {DB_NOW} + %s, attempts = attempts + 1, started_at = %s FROM head "
                f"WHERE j.id = head.id RETURNING {', '.join('j.' + c for c in RECORD_COLUMNS.split(', '))}, "
                "j.image AS legacy_image), "
                "line AS (INSERT INTO flux_logs (request_id, ts, level, source, message) "
                "SELECT id, %s, 'INFO', 'USER', %s FROM claimed), "
                "woken AS (SELECT pg_notify(%s, id) FROM claimed) "
                # The input images, read here and nowhere else; a job queued before the inputs
                # table kept its image in the jobs row.
                "SELECT claimed.*, COALESCE(i.image, claimed.legacy_image), i.mask, i.reference_image, "
                "(SELECT json_agg(json_build_array(ts, level, source, message) "
                "ORDER BY l.id) FROM flux_logs l WHERE l.request_id = claimed.id), "
                "(SELECT count(*) FROM woken) FROM claimed "
                "LEFT JOIN flux_job_inputs i ON i.request_id = claimed.id",
                (*head_params, worker_id, self.lease_seconds, now, utc_timestamp(now), started, CHANNEL),
            ).fetchone()
            if row is None:
                return None
            *record_row, _legacy, image, mask, reference_image, logs, _woken = row
            earlier = [
                LogEntry(timestamp=ts, level=level, source=source, message=message)
                for ts, level, source, message in logs or []
            ]
            job = with_inputs(
                Job.model_validate_json(record_row[2]),
                bytes(image) if image is not None else None,
                bytes(mask) if mask is not None else None,
                bytes(reference_image) if reference_image is not None else None,
            )
            # The statement's own log line is not visible to it: add it here.
            started_line = LogEntry(timestamp=utc_timestamp(now), message=started)
            return self._record(tuple(record_row), [*earlier, started_line], job)

        return self._tx(claim)  # QueueUnavailable: the worker waits the outage out (server/worker)

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

        return (self._tx if heartbeat else self._run)(renew)

    def is_cancel_requested(self, request_id: str) -> bool:
        row = self._run(
            lambda conn: conn.execute(
                "SELECT cancel_requested FROM flux_jobs WHERE id = %s", (request_id,)
            ).fetchone()
        )
        return bool(row and row[0])

    def log(self, request_id: str, message: str, progress: float | None = None) -> None:
        # One statement (one round trip per denoising step): the line, the progress, the wake-up.
        self._run(
            lambda conn: conn.execute(
                "WITH line AS (INSERT INTO flux_logs (request_id, ts, level, source, message) "
                "VALUES (%s, %s, 'INFO', 'USER', %s)), "
                "progress AS (UPDATE flux_jobs SET progress = %s WHERE id = %s AND %s::double precision "
                "IS NOT NULL) SELECT pg_notify(%s, %s)",
                (
                    request_id,
                    utc_timestamp(time.time()),
                    message,
                    progress,
                    request_id,
                    progress,
                    CHANNEL,
                    request_id,
                ),
            )
        )

    def complete(self, request_id: str, worker_id: str, result: JobResult) -> bool:
        def complete(conn: psycopg.Connection) -> bool:
            done = self._finish(
                conn,
                request_id,
                time.time(),
                result=result,
                condition="status = 'IN_PROGRESS' AND worker = %s",
                params=(worker_id,),
            )
            # The retry of a completion whose COMMIT was acknowledged to nobody (the connection
            # broke after the server committed; `_with_connection` or the worker retries): the
            # same worker's same result is already there, so this completion did happen.
            return (
                done
                or conn.execute(
                    "SELECT 1 FROM flux_jobs WHERE id = %s AND status = 'COMPLETED' AND worker = %s "
                    "AND result_json = %s",
                    (request_id, worker_id, result.model_dump_json()),
                ).fetchone()
                is not None
            )

        return self._tx(complete)

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
                f"UPDATE flux_jobs SET {REQUEUE}, attempts = GREATEST(attempts - 1, 0) "
                "WHERE id = %s AND worker = %s AND status = 'IN_PROGRESS' RETURNING 1",
                (request_id, worker_id),
            ).fetchone()
            if row is None:
                return False
            self._add_log(conn, request_id, message, time.time())
            self._notify(conn, [request_id, SUBMIT_KEY])
            return True

        return self._tx(requeue)
