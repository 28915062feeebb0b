"""`flux-server serve|api` with a queue URL that cannot be used: one line naming the host and
the cause, within seconds, before any process starts. `flux-server worker` does not check: it
waits for the queue by itself (a database failover can outlast its start)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pg_server import PostgresServer
from tests.support import free_port

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("command", ["serve", "api"])
def test_a_wrong_password_fails_start_up_with_one_line(
    command: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = postgres_server.url(password="not-the-password")
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.supervisor.cli",
            command,
            "--data-dir",
            str(tmp_path),
            "--queue-url",
            url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 20
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("flux-server: the queue database at 127.0.0.1:")
    assert "password authentication failed" in lines[0] and "not-the-password" not in lines[0]


def test_a_queue_url_of_another_kind_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.supervisor.cli",
            "api",
            "--data-dir",
            str(tmp_path),
            "--queue-url",
            "redis://h:6379",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "postgresql://" in done.stderr


def test_the_worker_command_waits_for_an_unreachable_queue_and_refuses_a_wrong_password(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.worker
    from server.supervisor.cli import main

    started: list[tuple[str | None, str | None]] = []

    def run_worker(settings: object, worker_id: str | None = None, gpu: str | None = None) -> int:
        started.append((worker_id, gpu))
        return 0

    monkeypatch.setattr(server.worker, "run_worker", run_worker)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    # A database that does not answer (a failover) is waited for by the worker itself.
    url = f"postgresql://flux:secret@127.0.0.1:{free_port()}/flux"
    argv = ["worker", "--data-dir", str(tmp_path), "--queue-url", url, "--worker-id", "w3", "--gpu", "GPU-a"]
    assert main(argv) == 0
    assert started == [("w3", "GPU-a")]  # handed to the worker, which waits for the queue
    # A wrong password is a configuration error: refused at once, with one line.
    wrong = postgres_server.url(password="not-the-password")
    assert main([*argv[:3], "--queue-url", wrong, *argv[5:]]) == 2
    assert started == [("w3", "GPU-a")]
