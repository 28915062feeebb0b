"""Nothing queued is lost: a worker killed mid-job, `serve` stopped with queued jobs, and
results that expire. Each test runs its own `flux-server serve` (the shared one stays calm).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import DEV, check_output, small_input, submit, wait_completed, wait_for, wait_running

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

# A few seconds of work at about 0.3-1 s per step: long enough to be killed in the middle.
MEDIUM_INPUT = {
    "prompt": "a harbour at dawn",
    "image_size": {"width": 512, "height": 512},
    "num_inference_steps": 12,
}
RETRY_MARK = "retrying"  # the queue's log line when a lost job goes back to the queue


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, certs, launch_flux_server
) -> Iterator:
    started = launch_flux_server(
        tmp_path_factory.mktemp("resilience"),
        tiny_model_dir=tiny_model_dir,
        certs=certs,
        args=["--lease-seconds", "5"],
    )
    yield started
    started.stop()


def kill_worker(server) -> int:
    pid = server.worker_pid()
    os.kill(pid, signal.SIGKILL)
    return pid


def logs_of(body: dict) -> list[str]:
    return [entry["message"] for entry in body["logs"]]


def running_again(body: dict) -> bool:
    """IN_PROGRESS on its second attempt, with a step done after the retry line."""
    messages = logs_of(body)
    retries = [i for i, m in enumerate(messages) if RETRY_MARK in m.lower()]
    return (
        body["status"] == "IN_PROGRESS"
        and bool(retries)
        and any("step" in m for m in messages[retries[-1] + 1 :])
    )


def test_worker_killed_mid_job_is_restarted_and_the_job_retried(server) -> None:
    with server.client() as client:
        request_id = submit(client, DEV, {**MEDIUM_INPUT, "seed": 1})["request_id"]
        wait_running(client, request_id)
        killed = kill_worker(server)
        done = wait_completed(client, request_id, timeout=180)
        assert done.get("error") is None, done
        assert any(RETRY_MARK in m.lower() for m in logs_of(done)), logs_of(done)
        result = client.get(f"/fal-ai/flux/requests/{request_id}").json()
        check_output(client, result, size=(512, 512))
    assert server.worker_pid() != killed
    log = server.log()
    assert "w0 killed by SIGKILL" in log and "restarting in" in log
    assert f"held {request_id}" in log  # released at once, not after the lease ran out
    server.wait_healthy()


def test_worker_killed_twice_on_one_job_completes_with_runner_disconnected(server) -> None:
    server.wait_healthy()
    with server.client() as client:
        request_id = submit(client, DEV, {**MEDIUM_INPUT, "seed": 2})["request_id"]
        wait_running(client, request_id)
        kill_worker(server)
        wait_for(client, request_id, running_again, timeout=180, what="second attempt running")
        kill_worker(server)
        done = wait_completed(client, request_id, timeout=60)
        assert done["error_type"] == "runner_disconnected", done
        result = client.get(f"/fal-ai/flux/requests/{request_id}")
        assert result.status_code == 503
        assert result.json()["error_type"] == "runner_disconnected"
        assert result.headers["x-fal-error-type"] == "runner_disconnected"
    server.wait_healthy(timeout=180)  # the worker is back for the next request


def test_api_process_killed_is_restarted(server) -> None:
    server.wait_healthy(timeout=180)
    api_pid = server.processes()["api"]
    os.kill(api_pid, signal.SIGKILL)
    # With several API processes (`--api-processes`), the killed manager's children may answer
    # for a few milliseconds more: wait for the supervisor's restart, then for health.
    deadline = time.monotonic() + 60
    while server.processes()["api"] == api_pid:
        assert time.monotonic() < deadline, "the API was not restarted"
        time.sleep(0.1)
    server.wait_healthy(timeout=60)
    assert "api killed by SIGKILL" in server.log()
    with server.client() as client:
        output = client.post(f"/run/{DEV}", json=small_input(seed=5)).json()
        check_output(client, output)


def test_restart_of_serve_keeps_queued_and_running_jobs(
    server, launch_flux_server, tiny_model_dir: Path, certs
) -> None:
    """Runs last in this module: it stops the module's server and starts a new one."""
    server.wait_healthy(timeout=180)
    with server.client() as client:
        running = submit(client, DEV, {**MEDIUM_INPUT, "seed": 3})["request_id"]
        wait_running(client, running)
        queued = [submit(client, DEV, small_input(seed=10 + i))["request_id"] for i in range(3)]
    assert server.stop(signal.SIGTERM) == 0
    assert "received SIGTERM; stopping" in server.log()

    # Same data directory and port: the stored jobs carry the URLs their clients were given.
    again = launch_flux_server(server.data_dir, tiny_model_dir=tiny_model_dir, certs=certs, port=server.port)
    try:
        with again.client() as client:
            for request_id, size in [(running, (512, 512)), *((q, (64, 64)) for q in queued)]:
                done = wait_completed(client, request_id, timeout=120)
                assert done.get("error") is None, done
                check_output(client, client.get(f"/fal-ai/flux/requests/{request_id}").json(), size=size)
    finally:
        again.stop()


def test_public_host_without_keys_refuses_to_start(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "server.supervisor.cli", "serve", "--host", "0.0.0.0"]
    argv += ["--data-dir", str(tmp_path)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0" in proc.stderr


def test_insecure_public_server_starts_and_expires_results(start_flux_server) -> None:
    server = start_flux_server(host="0.0.0.0", args=["--insecure-no-auth", "--retention-seconds", "2"])
    assert "listening on 0.0.0.0" in server.log()
    with server.client() as client:
        response = client.post(f"/run/{DEV}", json=small_input())
        assert response.status_code == 200, response.text
        request_id = response.headers["x-fal-request-id"]
        output = response.json()
        url = output["images"][0]["url"]
        stored = server.data_dir / "files" / output["images"][0]["file_name"]
        assert stored.is_file()
        deadline = time.monotonic() + 30
        while client.get(f"/fal-ai/flux/requests/{request_id}").status_code != 404:
            assert time.monotonic() < deadline, "the result was not purged"
            time.sleep(0.25)
        assert not stored.exists()
        assert client.get(url).status_code == 404
        with pytest.raises(httpx.HTTPStatusError):
            client.get(f"/fal-ai/flux/requests/{request_id}/status").raise_for_status()
