"""A GPU worker pod's process as the manifests run it, for real on the CPU: `flux-server serve`
with one worker and its own API, named by the pod (FLUX_BOX_NAME), on PostgreSQL. Its probes
answer; KEDA's query for its pool counts the job it runs; SIGTERM puts that job back in the
queue well within the pod's grace period."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from server.jobs import Status
from server.queue.autoscaling import QUEUED_JOBS_SQL, workers_wanted_sql
from server.queue.postgres import PostgresQueue
from tests.conftest import StartServer
from tests.deploy.kube import component, container, env, of_kind, render
from tests.deploy.test_autoscaler_query import scalar
from tests.pg_server import PostgresServer
from tests.server.queue.conftest import make_job
from tests.support import wait_until

POOL = "flux-worker-h100"
POD = f"{POOL}-5d8f7c9b4-x7k2p"  # <deployment>-<pod-template-hash>-<id>, as Kubernetes names it


def pod_flags() -> list[str]:
    """The worker container's FLUX_* settings given by value, as command-line flags."""
    (worker,) = [d for d in of_kind(render("multi-gpu"), "Deployment") if d["metadata"]["name"] == POOL]
    flags = []
    for name in ("FLUX_ROLE", "FLUX_WORKERS", "FLUX_API_PROCESSES"):
        flags += [f"--{name[5:].lower().replace('_', '-')}", env(container(worker))[name]["value"]]
    return flags


@pytest.mark.slow
def test_a_worker_pod_answers_its_probes_is_counted_by_its_pool_and_drains_on_sigterm(
    postgres_server: PostgresServer, start_flux_server: StartServer
) -> None:
    url = postgres_server.fresh_database_url()
    flags = pod_flags()
    assert flags[:2] == ["--role", "all"]
    # --workers 1 comes from the manifest too (launch_server passes its own first).
    server = start_flux_server(tls=False, args=[*flags, "--queue-url", url, "--box-name", POD])
    with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
        assert client.get("/health/live").status_code == 200  # livenessProbe
        ready = client.get("/health/ready")  # startupProbe, readinessProbe
        assert ready.status_code == 200 and ready.json()["workers_ready"] == 1

    queue = PostgresQueue(url, role="api")
    try:
        request_id = queue.submit(make_job(width=1024, height=1024, num_inference_steps=50)).id
        wait_until(lambda: (r := queue.get(request_id)) and r.progress > 0, 120, "the job to run")
        assert queue.get(request_id).worker == f"{POD}-w0"
        assert scalar(url, workers_wanted_sql(40, POOL)) == 1  # its running job
        assert scalar(url, workers_wanted_sql(40, "flux-worker-l40s")) == 0  # not another pool's

        started = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout=60.0) == 0
        drained = time.monotonic() - started
        record = queue.get(request_id)
        assert record.status is Status.IN_QUEUE and record.attempts == 0, record
        assert scalar(url, QUEUED_JOBS_SQL) == 1
        workers = [d for d in of_kind(render("multi-gpu"), "Deployment") if component(d) == "worker"]
        grace = min(d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] for d in workers)
        # Measured on a shared 2-core machine; the GPU's step is shorter than this CPU's.
        assert drained < grace / 2, f"drained in {drained:.1f} s, grace period {grace} s"
    finally:
        queue.close()
