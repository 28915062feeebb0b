"""Box roles on a shared queue: an API-only box (no torch, no workers) and a workers-only box
(no HTTP port), each a real `flux-server serve`."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from server.config import Settings
from server.jobs import Job
from server.queue.factory import open_queue
from tests.conftest import FluxServer, free_port, launch_server
from tests.pg_server import PostgresServer

pytestmark = pytest.mark.timeout(300)


def loaded_torch(pid: int) -> bool:
    """Whether a process has torch's shared library mapped (it imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_an_api_only_box_runs_no_worker_and_never_imports_torch(
    postgres_server: PostgresServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url = postgres_server.fresh_database_url()
    queue = open_queue(Settings(data_dir=tmp_path / "observer", queue_url=url), role="test")
    box = launch_server(
        tmp_path / "api-box", tiny_model_dir=tiny_model_dir, certs=None, wait=False,
        args=["--role", "api", "--queue-url", url],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # up: ready once its queue answers, degraded while no box has a worker
            try:
                health = box.health()
                break
            except Exception:
                assert time.monotonic() < deadline and box.process.poll() is None, box.log()
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["role"] == "api"
        assert health.json()["status"] == "degraded"
        assert health.json()["reason"] == "no worker of any box is ready yet"
        queue.set_worker_state("gpu-box-w0", "ready", device="cuda:0", model="tiny")  # another box
        body = box.wait_healthy(timeout=30)
        assert [w["id"] for w in body["workers"]] == ["gpu-box-w0"]
        processes = box.processes()
        assert processes["workers"] == {}
        assert not loaded_torch(processes["supervisor"]) and not loaded_torch(processes["api"])
        with box.client() as client:
            request_id = client.post("/fal-ai/flux/dev", json={"prompt": "queued for the GPU boxes"}).json()[
                "request_id"
            ]
        assert queue.get(request_id).job.prompt == "queued for the GPU boxes" and queue.depth() == 1
    finally:
        box.stop()
        queue.close()


def test_a_workers_only_box_listens_on_no_port_and_runs_jobs(
    postgres_server: PostgresServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url = postgres_server.fresh_database_url()
    queue = open_queue(Settings(data_dir=tmp_path / "observer", queue_url=url), role="test")
    port = free_port()
    box: FluxServer = launch_server(
        tmp_path / "gpu-box", tiny_model_dir=tiny_model_dir, certs=None, wait=False, port=port,
        args=["--role", "workers", "--queue-url", url, "--box-name", "gpu-box-7"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not any(w.worker_id == "gpu-box-7-w0" and w.state == "ready" for w in queue.workers()):
            assert time.monotonic() < deadline and box.process.poll() is None, box.log()
            time.sleep(0.5)
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert box.processes()["api"] is None
        record = queue.submit(
            Job(prompt="from another box's API", width=64, height=64, num_inference_steps=2)
        )
        while (done := queue.get(record.id)) is None or done.completed_at is None:
            assert time.monotonic() < deadline, box.log()
            time.sleep(0.2)
        assert done.succeeded and "Started on gpu-box-7-w0" in [e.message for e in done.logs]
    finally:
        box.stop()
        queue.close()
