"""The SQLite queue's tables and their migrations, and the connection settings every user of
the database file needs.

Each migration runs in one `BEGIN IMMEDIATE` transaction that also sets `PRAGMA user_version`,
so several processes opening a new or older database at once apply each step once, in order.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

# The first schema. Its counts table must be filled from the jobs already queued (a database
# made before it existed) before its triggers start keeping it.
_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    app_id TEXT NOT NULL,
    status TEXT NOT NULL,
    priority_rank INTEGER NOT NULL,
    job_json TEXT NOT NULL,  -- the Job without its input images
    image BLOB,  -- legacy: input images live in job_inputs since schema v3 (read only by claims)
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
"""

# Indexes that let the once-a-second maintenance and the dispatcher find due rows (or learn
# that there are none) without reading the tables.
_V2 = """
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (lease_expires) WHERE status = 'IN_PROGRESS';
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (due_at)
    WHERE delivered_at IS NULL AND gave_up = 0;
"""

# Input images (image, mask; reference_image since Kontext inpainting, added by
# `_add_columns`) apart from the jobs table: a status poll reads a jobs row, and a row must not
# drag megabytes of PNG through the page cache on every poll. Only a claim reads them;
# completing a job deletes them (no worker needs them again).
_V3 = """
CREATE TABLE IF NOT EXISTS job_inputs (
    request_id TEXT PRIMARY KEY,
    image BLOB,
    mask BLOB
);
"""
# Columns added to existing tables after their version: (table, column, type). ALTER TABLE
# cannot be made idempotent in a script, so each is added when missing, outside the versions.
_ADDED_COLUMNS = (
    ("jobs", "image", "BLOB"),  # claims read it for jobs queued before schema v3
    ("jobs", "tenant", "TEXT"),  # Job.tenant: who submitted it (None: no named key)
    ("jobs", "fair_tag", "REAL NOT NULL DEFAULT 0"),  # the fair-share order within a priority class
    ("job_inputs", "reference_image", "BLOB"),  # Kontext inpainting's reference image
)

# Fair share between tenants (server/queue/fairshare.py): claims and positions follow
# (priority_rank, fair_tag, seq) of the queued jobs; a submit finds its tenant's newest queued
# job with the second index. The columns are added by `_add_missing_columns` first (SQLite has
# no ADD COLUMN IF NOT EXISTS). Jobs queued before keep tag 0: they stay first, in their order.
_V4 = """
DROP INDEX IF EXISTS jobs_queue;
CREATE INDEX IF NOT EXISTS jobs_fair ON jobs (priority_rank, fair_tag, seq) WHERE status = 'IN_QUEUE';
CREATE INDEX IF NOT EXISTS jobs_tenant_queue ON jobs ((COALESCE(tenant, '')), priority_rank, fair_tag)
    WHERE status = 'IN_QUEUE';
"""

# Usage per UTC day, tenant and app id (server/queue/usage.py), added to as each job completes
# and never purged; and the Idempotency-Key rows of keyed submits (server/queue/idempotency.py),
# deleted once older than their window (the index finds them).
_V5 = """
CREATE TABLE IF NOT EXISTS tenant_usage (
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    app_id TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0,
    pixels INTEGER NOT NULL DEFAULT 0,
    gpu_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant, app_id)
);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created ON idempotency_keys (created_at);
"""

# Every statement is idempotent, so a step that two processes both saw as missing is harmless.
MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5)

SCHEMA_VERSION = len(MIGRATIONS)


def open_connection(db_path: Path) -> sqlite3.Connection:
    """A connection with the pragmas every user of the queue database needs. Autocommit mode:
    callers write `BEGIN IMMEDIATE` ... `COMMIT` around multi-statement changes."""
    conn = sqlite3.connect(str(db_path), timeout=30.0, isolation_level=None, cached_statements=256)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA temp_store = MEMORY")
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    return int(version)


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the database to `SCHEMA_VERSION` (WAL mode, every table and index)."""
    _use_wal(conn)
    for version, script in enumerate(MIGRATIONS, start=1):
        if schema_version(conn) >= version:
            continue
        if version > 1:  # later steps may index columns the first schema did not have
            _add_missing_columns(conn)
        conn.executescript(f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {version};\nCOMMIT;")
    _add_missing_columns(conn)


def _use_wal(conn: sqlite3.Connection, patience: float = 30.0) -> None:
    """Switch the file to WAL (a persistent setting: a no-op once any process did it).

    The switch upgrades a read lock to an exclusive one, and SQLite answers "database is
    locked" at once, without its busy handler, while another process holds the write lock
    (waiting could deadlock). Processes that open a new database together (the API and
    several workers at start-up) meet exactly that, so the switch is retried here."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A database made before a column of `_ADDED_COLUMNS` existed gets it (a table not made
    yet is skipped: its version creates it whole); checked again under the write lock, so that
    processes migrating at once add each column once."""

    def missing() -> list[tuple[str, str, str]]:
        tables = {table: _columns(conn, table) for table, _, _ in _ADDED_COLUMNS}
        return [
            (table, column, kind)
            for table, column, kind in _ADDED_COLUMNS
            if tables[table] and column not in tables[table]
        ]

    if not missing():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, kind in missing():
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
