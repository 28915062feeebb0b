"""server/queue/autoscaling.py without a database: what it refuses, and the command that prints
the SQL for a manifest (tests/deploy/test_autoscaler_query.py runs the SQL on PostgreSQL)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from server.exit_codes import EXIT_USAGE
from server.queue.autoscaling import pool_worker_pattern, workers_wanted_sql
from tests.conftest import REPO


@pytest.mark.parametrize(
    "pool", ["flux-worker'; DROP TABLE flux_jobs; --", "Flux-Worker", "-pool", "pool-", "a" * 64]
)
def test_a_pool_that_is_no_deployment_name_is_refused(pool: str) -> None:
    with pytest.raises(ValueError, match="not a Kubernetes Deployment name"):
        workers_wanted_sql(8, pool)


def test_fewer_than_one_queued_job_per_worker_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        workers_wanted_sql(0)


def test_the_pool_pattern_matches_its_pods_workers_only() -> None:
    pattern = re.compile(pool_worker_pattern("flux-worker"))
    assert pattern.match("flux-worker-5d8f7c9b4-x7k2p-w0")
    assert not pattern.match("flux-worker-h100-5d8f7c9b4-x7k2p-w0")  # another pool's pod
    assert not pattern.match("flux-worker-5d8f7c9b4-x7k2p")  # not a worker id


def test_the_command_prints_the_sql_for_a_manifest() -> None:
    command = [sys.executable, "-m", "server.queue.autoscaling"]
    done = subprocess.run(
        [*command, "--queued-per-worker", "40", "--pool", "flux-worker-h100"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0 and done.stdout == workers_wanted_sql(40, "flux-worker-h100") + "\n"
    refused = subprocess.run([*command, "--queued-per-worker", "0"], capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == EXIT_USAGE and "at least 1" in refused.stderr
