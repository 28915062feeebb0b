"""KEDA's query (server/queue/autoscaling.py), and the very text each rendered ScaledObject
carries, run against a real PostgreSQL queue holding a known mix of queued, running and
finished jobs, put there through the queue's own submit, claim, complete, fail and cancel."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from server.jobs import JobError, cancelled_error
from server.queue.autoscaling import QUEUED_JOBS_SQL, workers_wanted_sql
from server.queue.postgres import PostgresQueue
from tests.deploy.kube import of_kind, render
from tests.pg_server import PostgresServer
from tests.server.queue.conftest import make_job, make_result

# Worker ids as the manifests make them: FLUX_BOX_NAME is the pod's name, <deployment>-<hash>-<id>.
H100 = ("flux-worker-h100-5d8f7c9b4-x7k2p-w0", "flux-worker-h100-5d8f7c9b4-q9w4z-w0")
L40S = "flux-worker-l40s-6c4b8d7f5-m2n8r-w0"
OUTSIDE = "render-box-3-1a2b3c-w0"  # a box outside the cluster on the same queue
QUEUED, RUNNING = 9, 4  # what the fixture leaves (plus 3 finished jobs)


@pytest.fixture
def url(postgres_server: PostgresServer) -> Iterator[str]:
    """A queue with 9 queued jobs, 4 running (2 on H100 pods, 1 on an L40S pod, 1 outside the
    cluster) and 3 finished (completed, failed, cancelled while queued)."""
    url = postgres_server.fresh_database_url()
    queue = PostgresQueue(url, role="api")
    try:
        ids = [queue.submit(make_job(seed=i)).id for i in range(16)]
        for worker in (*H100, L40S, OUTSIDE):
            assert queue.claim(worker, timeout=0) is not None
        done = queue.claim(H100[0] + "x", timeout=0)  # a pod that has gone since
        assert done is not None and queue.complete(done.id, H100[0] + "x", make_result())
        failed = queue.claim(L40S, timeout=0)
        error = JobError(message="boom", error_type="internal_server_error", status_code=500)
        assert failed is not None and queue.fail(failed.id, L40S, error)
        assert queue.fail(ids[-1], None, cancelled_error())
        assert queue.depth() == QUEUED
        yield url
    finally:
        queue.close()


def scalar(url: str, sql: str) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


def test_the_queued_count_is_the_queues_depth(url: str) -> None:
    assert scalar(url, QUEUED_JOBS_SQL) == QUEUED


@pytest.mark.parametrize(
    ("per_worker", "pool", "wanted"),
    [
        (4, "flux-worker-h100", 2 + 3),  # its 2 running + ceil(9 / 4)
        (16, "flux-worker-l40s", 1 + 1),  # its 1 running + ceil(9 / 16)
        (9, "flux-worker-h100", 2 + 1),  # exactly one worker per 9 queued
        (1, "flux-worker", 0 + 9),  # no pod of a Deployment named flux-worker is running a job
        (5, None, 4 + 2),  # every worker's running jobs, the outside box's too
    ],
)
def test_workers_wanted_counts_the_pools_running_jobs_and_the_backlog(
    url: str, per_worker: int, pool: str | None, wanted: int
) -> None:
    value = scalar(url, workers_wanted_sql(per_worker, pool))
    assert isinstance(value, int) and value == wanted  # KEDA needs an integer


def test_an_empty_queue_wants_no_worker_not_null(postgres_server: PostgresServer) -> None:
    url = postgres_server.fresh_database_url()
    PostgresQueue(url, role="api").close()  # creates the tables
    assert scalar(url, workers_wanted_sql(40, "flux-worker-h100")) == 0
    assert scalar(url, QUEUED_JOBS_SQL) == 0


def test_the_rendered_scaled_objects_queries_run_on_the_queue(url: str) -> None:
    by_pool = {}
    for scaled in of_kind(render("multi-gpu"), "ScaledObject"):
        (trigger,) = scaled["spec"]["triggers"]
        by_pool[scaled["spec"]["scaleTargetRef"]["name"]] = scalar(url, trigger["metadata"]["query"])
    # h100: 2 running + ceil(9 / 40); l40s: 1 running + ceil(9 / 16)
    assert by_pool == {"flux-worker-h100": 3, "flux-worker-l40s": 2}
