"""The PostgreSQL queue's tables, created and migrated at start under an advisory lock, so
that ten boxes starting at once apply each step exactly once, in order.

Tables carry a `flux_` prefix: the database may be one the studio shares with other tools.
`flux_schema_version` holds one row per applied step.
"""

from __future__ import annotations

import psycopg

# pg_advisory_xact_lock keys (any 64-bit numbers, fixed for this application).
MIGRATION_LOCK = 0x464C5558_0001  # "FLUX" 1
PURGE_LOCK = 0x464C5558_0002

_V1 = """
CREATE SEQUENCE IF NOT EXISTS flux_jobs_seq START WITH 1;
-- A job put back goes to the head: its seq comes from a sequence that counts down from 0.
CREATE SEQUENCE IF NOT EXISTS flux_jobs_head_seq INCREMENT BY -1 START WITH 0
    MINVALUE -9223372036854775808 MAXVALUE 0;
CREATE TABLE IF NOT EXISTS flux_jobs (
    id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL DEFAULT nextval('flux_jobs_seq'),
    app_id TEXT NOT NULL,
    status TEXT NOT NULL,
    priority_rank SMALLINT NOT NULL,
    job_json TEXT NOT NULL,  -- the Job without its input images
    image BYTEA,  -- legacy: input images live in flux_job_inputs since schema v2
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    completed_at DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_expires DOUBLE PRECISION,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    result_json TEXT,
    error_json TEXT,
    start_deadline DOUBLE PRECISION,
    webhook BOOLEAN NOT NULL DEFAULT FALSE
);
-- The queue in claim order: claims, positions (a range count) and depth read only this.
CREATE INDEX IF NOT EXISTS flux_jobs_queue ON flux_jobs (priority_rank, seq) WHERE status = 'IN_QUEUE';
CREATE INDEX IF NOT EXISTS flux_jobs_deadline ON flux_jobs (start_deadline)
    WHERE status = 'IN_QUEUE' AND start_deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS flux_jobs_lease ON flux_jobs (lease_expires) WHERE status = 'IN_PROGRESS';
CREATE INDEX IF NOT EXISTS flux_jobs_worker ON flux_jobs (worker) WHERE status = 'IN_PROGRESS';
CREATE INDEX IF NOT EXISTS flux_jobs_completed ON flux_jobs (completed_at) WHERE status = 'COMPLETED';
CREATE TABLE IF NOT EXISTS flux_logs (
    id BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    level TEXT NOT NULL,
    source TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flux_logs_request ON flux_logs (request_id, id);
CREATE TABLE IF NOT EXISTS flux_deliveries (
    request_id TEXT PRIMARY KEY,
    due_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    delivered_at DOUBLE PRECISION,
    gave_up BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS flux_deliveries_due ON flux_deliveries (due_at)
    WHERE delivered_at IS NULL AND NOT gave_up;
CREATE TABLE IF NOT EXISTS flux_workers (
    worker_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    device TEXT NOT NULL,
    model TEXT NOT NULL,
    detail TEXT NOT NULL,
    pid INTEGER NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
"""

# Input images (image, mask; reference_image since v4) apart from the jobs table: status polls
# never read them, only a claim does; completing a job deletes them (no worker needs them again).
_V2 = """
CREATE TABLE IF NOT EXISTS flux_job_inputs (
    request_id TEXT PRIMARY KEY,
    image BYTEA,
    mask BYTEA
);
"""

# Fair share between tenants (server/queue/fairshare.py): claims and positions follow
# (priority_rank, fair_tag, seq) of the queued jobs; a submit finds its tenant's newest queued
# job with the second index. Jobs queued before keep tag 0: they stay first, in their order.
_V3 = """
ALTER TABLE flux_jobs ADD COLUMN IF NOT EXISTS tenant TEXT;
ALTER TABLE flux_jobs ADD COLUMN IF NOT EXISTS fair_tag DOUBLE PRECISION NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS flux_jobs_queue;
CREATE INDEX IF NOT EXISTS flux_jobs_fair ON flux_jobs (priority_rank, fair_tag, seq)
    WHERE status = 'IN_QUEUE';
CREATE INDEX IF NOT EXISTS flux_jobs_tenant_queue
    ON flux_jobs ((COALESCE(tenant, '')), priority_rank, fair_tag) WHERE status = 'IN_QUEUE';
"""

# Kontext inpainting's reference image, stored like the image and the mask.
_V4 = """
ALTER TABLE flux_job_inputs ADD COLUMN IF NOT EXISTS reference_image BYTEA;
"""

# Usage per UTC day, tenant and app id (server/queue/usage.py), added to as each job completes
# and never purged; and the Idempotency-Key rows of keyed submits (server/queue/idempotency.py),
# deleted once older than their window (the index finds them).
_V5 = """
CREATE TABLE IF NOT EXISTS flux_usage (
    day TEXT NOT NULL,
    tenant TEXT NOT NULL,
    app_id TEXT NOT NULL,
    requests BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    images BIGINT NOT NULL DEFAULT 0,
    pixels BIGINT NOT NULL DEFAULT 0,
    gpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant, app_id)
);
CREATE TABLE IF NOT EXISTS flux_idempotency_keys (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    body_hash TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX IF NOT EXISTS flux_idempotency_keys_created ON flux_idempotency_keys (created_at);
"""

MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: psycopg.Connection) -> int:
    exists = conn.execute("SELECT to_regclass('flux_schema_version') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM flux_schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: psycopg.Connection) -> None:
    """Bring the database to `SCHEMA_VERSION`; a no-op read when it is there already."""
    if schema_version(conn) >= SCHEMA_VERSION:
        conn.rollback()
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS flux_schema_version "
            "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        applied = schema_version(conn)  # again, under the lock: another box may have done it
        for version, script in enumerate(MIGRATIONS, start=1):
            if version > applied:
                conn.execute(script)
                conn.execute("INSERT INTO flux_schema_version (version) VALUES (%s)", (version,))
