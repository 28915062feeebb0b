"""Notifier: datagram wake-ups between processes, stale sockets, long run directories."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from server.queue.notify import Notifier, socket_dir

REPO = Path(__file__).resolve().parents[3]


def test_wait_returns_payloads_sent_to_the_role_and_times_out_otherwise(tmp_path: Path) -> None:
    worker = Notifier(tmp_path, "worker")
    api = Notifier(tmp_path, "api")
    try:
        assert worker.wait(0.05) == []
        api.notify("worker", b"")
        api.notify("api", b"not for workers")
        assert worker.wait(1.0) == [b""]
        assert worker.wait(0.01) == []  # drained
        # a datagram sent before anyone waits is kept, so no wake-up is lost
        api.notify("worker", b"early")
        assert worker.wait(0) == [b"early"]
    finally:
        worker.close()
        api.close()
    assert not worker.path.exists()


def test_stale_socket_files_are_removed_and_ignored(tmp_path: Path) -> None:
    sender = Notifier(tmp_path, "api")
    stale = Notifier(tmp_path, "worker")
    stale._sock.close()  # a process that died without unlinking its socket
    try:
        assert stale.path.exists()
        sender.notify("worker", b"x")
        assert not stale.path.exists()
    finally:
        sender.close()


def test_long_run_dir_falls_back_to_a_short_shared_directory(tmp_path: Path) -> None:
    long_dir = tmp_path / ("x" * 120)
    assert socket_dir(long_dir) == socket_dir(long_dir) != long_dir.absolute()
    one, two = Notifier(long_dir, "worker"), Notifier(long_dir, "api")
    try:
        two.notify("worker", b"hi")
        assert one.wait(1.0) == [b"hi"]
    finally:
        one.close()
        two.close()


def test_async_waiters_are_woken_by_their_key_only(tmp_path: Path) -> None:
    api = Notifier(tmp_path, "api")
    other = Notifier(tmp_path, "worker")

    async def scenario() -> tuple[bool, bool, float]:
        threading.Timer(0.1, other.notify, args=("api", b"req-1\ndeliveries")).start()
        began = time.monotonic()
        woke, other_key = await asyncio.gather(api.wait_for("req-1", 5), api.wait_for("req-2", 0.3))
        return woke, other_key, time.monotonic() - began

    try:
        woke, other_key, elapsed = asyncio.run(scenario())
    finally:
        api.close()
        other.close()
    assert woke and not other_key
    assert elapsed < 1.0


def test_wakes_a_waiter_in_another_process(tmp_path: Path) -> None:
    script = (
        "import sys, time; from pathlib import Path; from server.queue.notify import Notifier\n"
        "n = Notifier(Path(sys.argv[1]), 'worker'); print('ready', flush=True)\n"
        "got = n.wait(10); print(time.time(), got, flush=True); n.close()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    sender = Notifier(tmp_path, "api")
    try:
        assert process.stdout.readline().strip() == "ready"
        sent_at = time.time()
        sender.notify("worker", b"go")
        woke_at, payload = process.stdout.read().split(" ", 1)
        assert process.wait(10) == 0
    finally:
        sender.close()
    latency_ms = (float(woke_at) - sent_at) * 1000
    print(f"cross-process datagram wake-up: {latency_ms:.2f} ms (pid {os.getpid()})")
    assert payload.strip() == "[b'go']" and latency_ms < 100
