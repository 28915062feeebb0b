"""The SQL that KEDA's `postgresql` scaler polls to size a pool of GPU workers
(deploy/kubernetes, docs/deploy.md "Autoscaling on the queue"), in one place.

A manifest cannot import Python, so each ScaledObject carries the text this module prints,
with the two numbers it was made from in its annotations (tests/deploy checks that they agree
and runs the SQL against a real PostgreSQL):

    python -m server.queue.autoscaling --queued-per-worker 40 --pool flux-worker-h100

Why not the queued count alone: KEDA's target is an average per replica, so a pool sized on
queued jobs shrinks while its GPUs are busy with an empty queue behind them; the pods it
removes are running jobs (requeued on SIGTERM, their work lost), and it grows back a cold
start later. The figure here is the number of workers the pool should have:

    workers wanted = the pool's running jobs (a worker runs one job at a time)
                   + ceil(queued jobs / queued_per_worker)

so with `targetQueryValue: "1"` the pool never goes below its busy workers, and adds one GPU
per `queued_per_worker` jobs waiting. docs/deploy.md derives `queued_per_worker` from a GPU's
images per minute and its cold start: a new GPU only helps once the backlog would outlast it.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from server.exit_codes import EXIT_USAGE

# The queue's own depth query (server/queue/postgres/queue.py: PostgresQueue.depth), for
# dashboards and a plain queued-jobs trigger; reads only the partial index of queued jobs.
QUEUED_JOBS_SQL = "SELECT count(*) FROM flux_jobs WHERE status = 'IN_QUEUE'"

# A Deployment's pods are named <deployment>-<pod-template-hash>-<5 characters>, and the pod
# name is the worker's box name (FLUX_BOX_NAME in the manifests), so its worker ids are
# <deployment>-<hash>-<suffix>-w<N> (server/supervisor/gpus.py).
_POOL_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def pool_worker_pattern(pool: str) -> str:
    """A PostgreSQL regular expression matching the worker ids of the Deployment `pool`'s pods
    (and no other pool's: `flux-worker` does not match `flux-worker-h100`'s pods)."""
    if not _POOL_NAME.fullmatch(pool) or len(pool) > 63:
        raise ValueError(f"pool {pool!r} is not a Kubernetes Deployment name")
    return f"^{pool}-[a-z0-9]+-[a-z0-9]+-w[0-9]+$"


def workers_wanted_sql(queued_per_worker: int, pool: str | None = None) -> str:
    """The scaler's query: running jobs of `pool` (every worker's when None) plus one worker
    per `queued_per_worker` queued jobs, rounded up. Returns one integer, never NULL."""
    if queued_per_worker < 1:
        raise ValueError(f"queued_per_worker must be at least 1, got {queued_per_worker}")
    running = "status = 'IN_PROGRESS'"
    if pool is not None:
        running += f" AND worker ~ '{pool_worker_pattern(pool)}'"
    return (
        f"SELECT count(*) FILTER (WHERE {running}) "
        f"+ ceil(count(*) FILTER (WHERE status = 'IN_QUEUE') / {queued_per_worker}.0)::bigint "
        "FROM flux_jobs WHERE status IN ('IN_QUEUE', 'IN_PROGRESS')"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.queue.autoscaling",
        description="Print the SQL for a KEDA postgresql trigger that sizes a pool of GPU workers.",
    )
    parser.add_argument("--queued-per-worker", type=int, required=True, help="queued jobs per added GPU")
    parser.add_argument("--pool", default=None, help="the workers' Deployment name (default: every worker)")
    args = parser.parse_args(argv)
    try:
        print(workers_wanted_sql(args.queued_per_worker, args.pool))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
