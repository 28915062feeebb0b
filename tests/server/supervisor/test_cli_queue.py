"""`flux-server serve|api|worker` with a queue URL that cannot be used: one line naming the
host and the cause, within seconds, before any process starts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pg_server import PostgresServer

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("command", ["serve", "api", "worker"])
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
