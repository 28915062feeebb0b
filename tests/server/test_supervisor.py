"""`flux-server serve`: supervision of the API and worker processes (the start-up checks are
in test_preflight.py).

Supervision is tested with real child processes standing in for the API and the workers
(a tiny HTTP listener, a worker that crashes, a worker that cannot load its model); the real
API and workers under supervision are covered by tests/e2e/test_resilience.py.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- supervision

SUPERVISE_SCRIPT = """
import sys, json
from pathlib import Path
import server.supervisor as sup
from server.config import Settings

data, port = Path(sys.argv[1]), int(sys.argv[2])
settings = Settings(data_dir=data, port=port, model="stand-in")
sup.logging.basicConfig(level="INFO", stream=sys.stderr)
supervisor = sup.Supervisor(settings, [sup.WorkerSlot("w0", None), sup.WorkerSlot("w1", None)])
api, crasher, broken = supervisor.children
api.argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
record = "import os, sys, time; open(sys.argv[1], 'a').write(f'{time.time()}\\\\n'); "
crasher.argv = [sys.executable, "-c", record + "sys.exit(1)", str(data / "w0.starts")]
broken.argv = [sys.executable, "-c", record + "sys.exit(2)", str(data / "w1.starts")]
for child in supervisor.children:
    child.backoff = 0.3
sys.exit(supervisor.run())
"""


def test_supervisor_restarts_crashed_workers_with_backoff_and_parks_load_failures(tmp_path: Path) -> None:
    from server.queue.sqlite import SQLiteQueue

    data = tmp_path / "d"
    data.mkdir()
    script = textwrap.dedent(SUPERVISE_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(data), str(free_port())],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )

    def start_count(name: str) -> int:
        path = data / f"{name}.starts"
        return len(path.read_text().split()) if path.exists() else 0

    # Three restarts of the crashing worker (0.3 s, 0.6 s, 1.2 s apart), one start of the
    # worker that cannot load its model; the supervisor keeps running meanwhile.
    wait_until(
        lambda: (start_count("w0") >= 4 and start_count("w1") >= 1) or proc.poll() is not None,
        60,
        "the crashing worker's restarts",
    )
    assert proc.poll() is None, proc.communicate()[1]
    pids = json.loads((data / "run" / "processes.json").read_text())
    assert pids["supervisor"] == proc.pid and pids["api"] > 0
    proc.send_signal(signal.SIGTERM)
    _, log = proc.communicate(timeout=40)
    assert proc.returncode == 0, log

    starts = [float(line) for line in (data / "w0.starts").read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) >= 3, log  # 0.3 s, 0.6 s, 1.2 s, 2.4 s apart
    # Each wait at least its doubled backoff (0.3, 0.6, 1.2 s); a loaded machine only adds
    # process start-up time on top, so lower bounds hold however slow it is.
    assert all(gap >= 0.3 * 2**n for n, gap in enumerate(gaps[:3])), gaps
    assert "w0 exited with status 1" in log and "restarting in" in log

    assert len((data / "w1.starts").read_text().split()) == 1  # a load failure is not retried
    assert "w1 could not load the model" in log

    queue = SQLiteQueue(data / "queue.sqlite3", data / "run", role="test")
    try:
        states = {w.worker_id: w for w in queue.workers()}
    finally:
        queue.close()
    assert states["w1"].state == "failed"
    assert "could not be loaded" in states["w1"].detail
    assert states["w0"].state == "stopped"


def test_serve_refuses_a_busy_port_before_starting_workers(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "server.cli", "serve", "--data-dir", str(tmp_path), "--port", str(port)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "run" / "processes.json").exists()  # no child was started
