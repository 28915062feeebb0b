"""`flux-server migrate-queue`: copy a one-box install's SQLite queue into PostgreSQL.

Run it with the server stopped (`serve` gives running jobs back to the queue when it stops),
then start every box with `--queue-url`. Queued requests keep their order and priority,
finished ones keep their results, logs and webhook delivery state, so clients can still read
them until retention deletes them. Queued jobs keep their input images. A job left running by
a crash is copied as queued, with its attempts. Usage rows (per tenant, app id and day) and
unexpired Idempotency-Key rows come along. Copying again skips what is already there, so an
interrupted run can simply be repeated.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

from server.queue.postgres.connection import connect
from server.queue.postgres.schema import migrate

_JOB_COLUMNS = (
    "id, app_id, status, priority_rank, job_json, image, created_at, started_at, completed_at, attempts, "
    "worker, lease_expires, cancel_requested, progress, result_json, error_json, start_deadline, webhook"
)
# Columns a file from an earlier release may lack (the target's defaults stand in for them).
_LATER_COLUMNS = ("tenant", "fair_tag")


@dataclass(frozen=True)
class Copied:
    queued: int
    finished: int
    skipped: int
    logs: int
    deliveries: int


def copy_sqlite_to_postgres(db_path: Path, url: str) -> Copied:
    """Copy every request of the SQLite file at `db_path` into the PostgreSQL queue at `url`,
    in one transaction."""
    if not Path(db_path).is_file():
        raise FileNotFoundError(f"no queue database at {db_path}")
    source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    with contextlib.closing(source), connect(url) as target:
        migrate(target)
        with target.transaction():
            # Claim order, so that queued jobs get PostgreSQL sequence numbers in that order; a
            # job left running goes to the head of its class, as a lost worker's job does.
            present = {row[1] for row in source.execute("PRAGMA table_info(jobs)")}
            columns = ", ".join([_JOB_COLUMNS, *(c for c in _LATER_COLUMNS if c in present)])
            jobs = source.execute(
                f"SELECT {columns} FROM jobs "
                "ORDER BY status = 'COMPLETED', priority_rank, status != 'IN_PROGRESS', seq"
            ).fetchall()
            jobs = _running_ones_to_the_head(jobs, columns)
            copied = [row for row in jobs if _copy_job(target, columns, row)]
            logs = sum(_copy_logs(source, target, row[0]) for row in copied)
            deliveries = sum(_copy_delivery(source, target, row[0]) for row in copied)
            if _has_table(source, "job_inputs"):  # a file from before schema v3 has none
                for row in copied:
                    _copy_inputs(source, target, row[0])
            _copy_usage_and_keys(source, target)
    finished = sum(row[2] == "COMPLETED" for row in copied)
    return Copied(
        queued=len(copied) - finished,
        finished=finished,
        skipped=len(jobs) - len(copied),
        logs=logs,
        deliveries=deliveries,
    )


def _running_ones_to_the_head(jobs: list[tuple], columns: str) -> list[tuple]:
    """A job left running goes back to the head of its class, as a lost worker's job does:
    copied first (the order above) with the class's smallest fair tag."""
    names = [name.strip() for name in columns.split(",")]
    if "fair_tag" not in names:
        return jobs
    status, rank, tag = names.index("status"), names.index("priority_rank"), names.index("fair_tag")
    smallest: dict[int, float] = {}
    for row in jobs:
        if row[status] != "COMPLETED":
            smallest[row[rank]] = min(smallest.get(row[rank], row[tag]), row[tag])
    return [
        (*row[:tag], smallest[row[rank]], *row[tag + 1 :]) if row[status] == "IN_PROGRESS" else row
        for row in jobs
    ]


def _copy_job(target: psycopg.Connection, columns: str, row: tuple) -> bool:
    """Insert one job; False if the target has it already."""
    values = list(row)
    if values[2] == "IN_PROGRESS":  # left running by a crash: back to the queue
        values[2], values[10], values[11], values[13] = "IN_QUEUE", None, None, 0.0
    values[12], values[17] = bool(values[12]), bool(values[17])  # SQLite keeps booleans as 0/1
    inserted = target.execute(
        f"INSERT INTO flux_jobs ({columns}) VALUES ({', '.join(['%s'] * len(values))}) "
        "ON CONFLICT (id) DO NOTHING RETURNING id",
        values,
    ).fetchone()
    return inserted is not None


def _copy_logs(source: sqlite3.Connection, target: psycopg.Connection, request_id: str) -> int:
    rows = source.execute(
        "SELECT request_id, ts, level, source, message FROM logs WHERE request_id = ? ORDER BY id",
        (request_id,),
    ).fetchall()
    with target.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO flux_logs (request_id, ts, level, source, message) VALUES (%s, %s, %s, %s, %s)",
            rows,
        )
    return len(rows)


def _has_table(source: sqlite3.Connection, name: str) -> bool:
    found = source.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return found.fetchone() is not None


def _copy_inputs(source: sqlite3.Connection, target: psycopg.Connection, request_id: str) -> None:
    """A job's input images (only jobs not yet completed have them). The source is opened
    read-only, so a file from before the reference image's column is read without it."""
    columns = {row[1] for row in source.execute("PRAGMA table_info(job_inputs)")}
    reference = "reference_image" if "reference_image" in columns else "NULL"
    row = source.execute(
        f"SELECT request_id, image, mask, {reference} FROM job_inputs WHERE request_id = ?", (request_id,)
    ).fetchone()
    if row is not None:
        target.execute(
            "INSERT INTO flux_job_inputs (request_id, image, mask, reference_image) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            row,
        )


# Tables copied whole (a file from before schema v5 has neither): (SQLite table, PostgreSQL
# table, columns, the same in both).
_COPIED_TABLES = (
    ("tenant_usage", "flux_usage", "day, tenant, app_id, requests, failed, images, pixels, gpu_seconds"),
    ("idempotency_keys", "flux_idempotency_keys", "tenant, key, body_hash, request_id, created_at"),
)


def _copy_usage_and_keys(source: sqlite3.Connection, target: psycopg.Connection) -> None:
    """The usage rows and Idempotency-Key rows; a row the target has already is kept as it is."""
    for source_table, target_table, columns in _COPIED_TABLES:
        if not _has_table(source, source_table):
            continue
        rows = source.execute(f"SELECT {columns} FROM {source_table}").fetchall()
        placeholders = ", ".join(["%s"] * len(columns.split(",")))
        with target.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {target_table} ({columns}) VALUES ({placeholders}) ON CONFLICT DO NOTHING", rows
            )


def _copy_delivery(source: sqlite3.Connection, target: psycopg.Connection, request_id: str) -> int:
    row = source.execute(
        "SELECT request_id, due_at, attempts, last_error, delivered_at, gave_up FROM deliveries "
        "WHERE request_id = ?",
        (request_id,),
    ).fetchone()
    if row is None:
        return 0
    target.execute(
        "INSERT INTO flux_deliveries (request_id, due_at, attempts, last_error, delivered_at, gave_up) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (*row[:5], bool(row[5])),
    )
    return 1


def migrate_queue_command(data_dir: Path, url: str) -> int:
    """The command line's side: one line of counts, or one line of why not."""
    from server.config import Settings
    from server.queue.base import QueueUnavailable

    db_path = Settings(data_dir=data_dir).db_path
    try:
        copied = copy_sqlite_to_postgres(db_path, url)
    except (FileNotFoundError, QueueUnavailable) as exc:
        print(f"flux-server: {exc}", file=sys.stderr)
        return 2
    print(
        f"copied {copied.queued} queued and {copied.finished} finished request(s) "
        f"({copied.logs} log lines, {copied.deliveries} webhook deliveries) from {db_path}; "
        f"{copied.skipped} already there"
    )
    return 0
