"""`flux-server api --api-processes N`: several real API processes on one port and one queue."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from server.api.main import default_api_processes
from server.jobs import Status
from server.queue.notify import socket_dir
from server.queue.sqlite import SQLiteQueue
from server.supervisor.cli import build_parser, settings_from_args
from tests.server.queue.conftest import make_result
from tests.support import free_port, wait_until

REPO = Path(__file__).resolve().parents[3]
BODY = {"prompt": "a fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


def test_api_processes_flag_and_environment_reach_the_settings(monkeypatch) -> None:
    assert settings_from_args(build_parser().parse_args(["api"])).api_processes is None
    # Unset: two processes where there are cores to spare, one on a small machine.
    assert default_api_processes(16) == 2 and default_api_processes(2) == 1
    monkeypatch.setenv("FLUX_API_PROCESSES", "3")
    assert settings_from_args(build_parser().parse_args(["api"])).api_processes == 3
    args = build_parser().parse_args(["serve", "--api-processes", "2"])
    settings = settings_from_args(args)
    # `serve` hands its settings to the API process it starts through the environment.
    assert settings.api_processes == 2 and settings.to_env()["FLUX_API_PROCESSES"] == "2"


def stream_until_completed(base: str, request_id: str, connected: list[str]) -> str:
    """A fresh connection (so the kernel may hand it to either process) reading the SSE stream;
    `request_id` is appended to `connected` once the first event arrived."""
    last = ""
    url = f"{base}/fal-ai/flux/requests/{request_id}/status/stream"
    with httpx.stream("GET", url, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                last = json.loads(line[6:])["status"]
                if request_id not in connected:
                    connected.append(request_id)
    return last


def test_several_api_processes_share_the_port_queue_and_wake_ups(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.supervisor.cli", "api", "--data-dir", str(tmp_path),
         "--port", str(port), "--api-processes", "2"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    worker = SQLiteQueue(tmp_path / "queue.sqlite3", tmp_path / "run", role="worker")
    try:
        deadline = time.monotonic() + 30
        sockets: list[str] = []
        while time.monotonic() < deadline:
            sockets = [p.name for p in socket_dir(tmp_path / "run").glob("api-*.sock")]
            if len(sockets) == 2:
                break
            assert proc.poll() is None, "the API exited"
            time.sleep(0.1)
        assert len(sockets) == 2, sockets  # one wake-up socket per process
        while not answers(base):  # the sockets exist a moment before HTTP is served
            assert time.monotonic() < deadline and proc.poll() is None, "the API does not answer"
            time.sleep(0.1)

        # New connections each time, spread over both processes: positions follow one queue.
        positions = []
        for _ in range(8):
            response = httpx.post(f"{base}/fal-ai/flux/dev", json=BODY, timeout=10)
            assert response.status_code == 200, response.text
            positions.append((response.json()["request_id"], response.json()["queue_position"]))
        assert [p for _, p in positions] == list(range(8))

        # Streams opened on either process end when a worker (another process) completes the job.
        ids = [request_id for request_id, _ in positions]
        with ThreadPoolExecutor(len(ids)) as pool:
            connected: list[str] = []
            streams = [pool.submit(stream_until_completed, base, i, connected) for i in ids]
            wait_until(lambda: len(connected) == len(ids), 30, "every stream's first event")
            started = time.monotonic()
            for _ in ids:
                record = worker.claim("w1", timeout=1)
                assert record is not None
                assert worker.complete(record.id, "w1", make_result())
            assert [s.result(timeout=20) for s in streams] == [Status.COMPLETED.value] * len(ids)
            assert time.monotonic() - started < 5

        # The processes die with their manager even when it is killed outright.
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while port_open(port):
            assert time.monotonic() < deadline, "an API process outlived its manager"
            time.sleep(0.1)
    finally:
        worker.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


def answers(base: str) -> bool:
    try:
        httpx.get(f"{base}/health", timeout=2)
    except httpx.TransportError:
        return False
    return True


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
