#!/usr/bin/env python
"""What fair share costs the queue (not a test): claims, submits and positions with a long
queue, on SQLite and on PostgreSQL, through the queue classes themselves (no HTTP).

For each backend, on a fresh store: submit `--jobs` jobs of one tenant ("a", the backlog) in
batches of 64 (as the API's group commit does), then time
- `submit`: per job, in those batches;
- `join`: one submit of another tenant into that backlog (it goes near the head, so its
  position counts the jobs it passes);
- `position`: a status poll's position read of the job in the middle;
- `claim`: per claim, `--claims` claims by one worker (each claim also logs its start line).

    .venv/bin/python scripts/bench_claim.py [--jobs 10000] [--claims 500] [--backend both]
                                            [--queue-url postgresql://...] [--out f.json]

Without `--queue-url` the PostgreSQL run starts a local server of its own (the test suite's,
from the `pgserver` wheel). Code without fair share (no `Job.tenant`) runs the same steps
with every job of no tenant: run the script with PYTHONPATH at an older checkout to compare.
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from server.config import Settings
from server.jobs import Job
from server.queue.base import JobQueue
from server.queue.factory import open_queue

BATCH = 64
HAS_TENANTS = "tenant" in Job.model_fields


def make_job(tenant: str) -> Job:
    fields: dict = {"prompt": "bench", "width": 64, "height": 64, "num_inference_steps": 2}
    if HAS_TENANTS:
        fields["tenant"] = tenant
    return Job(**fields)


def per_call_ms(call: Callable[[], object], repeat: int) -> float:
    """The median of `repeat` timed calls, in milliseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(queue: JobQueue, jobs: int, claims: int) -> dict[str, float]:
    started = time.perf_counter()
    ids: list[str] = []
    for offset in range(0, jobs, BATCH):
        batch = [make_job("a") for _ in range(min(BATCH, jobs - offset))]
        ids += [record.id for record, _ in queue.submit_many(batch)]
    submit_ms = (time.perf_counter() - started) * 1000 / jobs
    join_ms = per_call_ms(lambda: queue.submit(make_job("b")), 20)
    middle = ids[len(ids) // 2]
    position_ms = per_call_ms(lambda: queue.position(middle), 200)
    claim_times = []
    for _ in range(claims):
        started = time.perf_counter()
        record = queue.claim("bench-worker", timeout=0)
        claim_times.append((time.perf_counter() - started) * 1000)
        assert record is not None
    return {
        "submit_ms_per_job": round(submit_ms, 4),
        "join_ms": round(join_ms, 3),
        "position_ms": round(position_ms, 3),
        "claim_ms_median": round(statistics.median(claim_times), 3),
        "claim_ms_p90": round(sorted(claim_times)[int(len(claim_times) * 0.9)], 3),
    }


def run_sqlite(tmp: Path, jobs: int, claims: int) -> dict[str, float]:
    settings = Settings(data_dir=tmp / "sqlite")
    queue = open_queue(settings, role="bench")
    try:
        return measure(queue, jobs, claims)
    finally:
        queue.close()


def run_postgres(tmp: Path, url: str | None, jobs: int, claims: int) -> tuple[dict[str, float], str]:
    server = None
    if url is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.pg_server import remove, start_postgres  # the test suite's local server

        server = start_postgres(tmp / "postgres")
        url = server.fresh_database_url()
    try:
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        queue = open_queue(Settings(data_dir=tmp / "pg-data", queue_url=url), role="bench")
        try:
            return measure(queue, jobs, claims), version
        finally:
            queue.close()
    finally:
        if server is not None:
            remove(server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs queued before the measurements")
    parser.add_argument("--claims", type=int, default=500, help="claims timed")
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--queue-url", default=None, help="a PostgreSQL database to use (emptied by nobody)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "fair_share": HAS_TENANTS,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "psycopg": psycopg.__version__,
        "jobs": args.jobs,
        "claims": args.claims,
    }
    with tempfile.TemporaryDirectory(prefix="bench-claim-") as tmp:
        if args.backend in ("sqlite", "both"):
            results["sqlite_results"] = run_sqlite(Path(tmp), args.jobs, args.claims)
            print("sqlite", results["sqlite_results"], flush=True)
        if args.backend in ("postgres", "both"):
            measured, version = run_postgres(Path(tmp), args.queue_url, args.jobs, args.claims)
            results["postgres_results"], results["postgresql"] = measured, version
            print(f"postgresql {version}", measured, flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
