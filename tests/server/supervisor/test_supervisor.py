"""`flux-server serve`'s supervision of the API and worker processes (the start-up checks are in
test_preflight.py, the GPU plan in test_gpus.py).

The supervisor runs in this test process (its signal handlers need the main thread) while a
watcher thread observes it; its children are real processes standing in for the API (a
tiny HTTP listener) and the workers (a script that crashes, fails to load, or claims a job
from the real queue and holds it). Faults from the outside world are real where they can be
(a PostgreSQL server stopped while a worker exits) and injected where they cannot (ENOSPC from
the pid file and the metrics directory, a full SQLite file). The real API and workers under
supervision are covered by tests/e2e/test_resilience.py.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from server.exit_codes import EXIT_CRASHED, EXIT_DEVICE_LOST, EXIT_HUNG, EXIT_LOAD_FAILED
from server.jobs import Job
from server.queue.base import WorkerInfo
from server.queue.factory import open_queue
from server.queue.sqlite import SQLiteQueue
from server.supervisor.children import BACKOFF_START, FAST_RESTART_DELAY, STABLE_AFTER, Child
from server.supervisor.gpus import WorkerSlot
from server.supervisor.loop import Supervisor
from tests.pg_server import PostgresServer, remove, start_postgres
from tests.support import free_port, wait_until

REPO = Path(__file__).resolve().parents[3]

# A stand-in worker: records each start (time, CUDA_VISIBLE_DEVICES), then acts out its mode.
STAND_IN = """
import os, sys, time
from pathlib import Path

mode, data, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
with open(data / f"{name}.starts", "a") as starts:
    starts.write(f"{time.time()} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\\n")
if mode == "crash":
    sys.exit(1)
from server.config import Settings  # the supervisor's settings, from FLUX_* variables
from server.queue.factory import open_queue

while True:  # as the real worker: wait for the queue, then release its predecessor's jobs
    try:
        queue = open_queue(Settings(), role="worker")
        queue.release_worker(name)
        break
    except Exception:
        time.sleep(0.2)
if mode == "cannot-load":  # as the real worker: its own reason in its row, then exit 3
    reason = "OSError: no weights in /nowhere"
    queue.set_worker_state(name, "failed", device="cpu", model="stand-in", detail=reason)
    sys.exit(3)
if mode == "claim-and-hold":  # hold a job until told to exit
    record = None
    while record is None:
        record = queue.claim(name, timeout=1.0)
    with open(data / f"{name}.claims", "a") as claims:
        claims.write(f"{record.id} {record.attempts}\\n")
    while not (data / f"{name}.exit").exists():
        time.sleep(0.05)
    (data / f"{name}.exit").unlink()
    sys.exit(1)
"""


def starts(data: Path, name: str) -> list[tuple[float, str]]:
    path = data / f"{name}.starts"
    lines = path.read_text().split("\n") if path.exists() else []
    return [(float(line.split()[0]), line.split()[1]) for line in lines if line]


def stand_in(supervisor: Supervisor, data: Path, modes: dict[str, str]) -> None:
    """Replace the command lines of the supervisor's children (their environment stays)."""
    script = data / "stand_in.py"
    script.write_text(STAND_IN)
    for child in supervisor.children:
        child.env["PYTHONPATH"] = str(REPO)
        if child.is_worker:
            child.argv = [sys.executable, str(script), modes[child.name], str(data), child.name]
        else:
            port = str(supervisor.settings.port)
            child.argv = [sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1"]


def supervise(supervisor: Supervisor, watch: Callable[[], None]) -> int:
    """Run the supervisor until `watch` (in a thread) returns; re-raise what `watch` raised."""
    errors: list[BaseException] = []

    def watcher() -> None:
        try:
            watch()
        except BaseException as exc:
            errors.append(exc)
        finally:
            supervisor.stopping = True

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    code = supervisor.run()
    thread.join(60)
    if errors:
        raise errors[0]
    return code


def rows(settings: Settings) -> dict[str, WorkerInfo]:
    queue = open_queue(settings, role="test")
    try:
        return {w.worker_id: w for w in queue.workers()}
    finally:
        queue.close()


@pytest.fixture(autouse=True)
def supervisor_logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="flux_server.supervisor")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for name in [n for n in os.environ if n.startswith("FLUX_")]:
        monkeypatch.delenv(name)


# --------------------------------------------------------------------------- restart policy


def test_each_exit_status_gets_its_restart_delay() -> None:
    worker = Child("w0", [], slot=WorkerSlot("w0", "0"))
    now = time.monotonic()

    worker.started_at = now  # exits at once: crashes back off, doubling
    delays = [worker.schedule_restart(EXIT_CRASHED, 300) for _ in range(3)]
    assert delays == [BACKOFF_START, 2 * BACKOFF_START, 4 * BACKOFF_START]
    assert worker.restarts == 3 and worker.last_exit == EXIT_CRASHED and worker.process is None

    worker.started_at = time.monotonic() - STABLE_AFTER  # ran stably: backoff reset
    assert worker.schedule_restart(EXIT_CRASHED, 300) == BACKOFF_START

    # A lost device or a hang after a stable run: at once, and the backoff does not grow.
    for code in (EXIT_DEVICE_LOST, EXIT_HUNG, EXIT_DEVICE_LOST):
        worker.started_at = time.monotonic() - STABLE_AFTER
        assert worker.schedule_restart(code, 300) == FAST_RESTART_DELAY
    assert worker.backoff == BACKOFF_START
    # ... and again right after its start: a broken GPU would spin, so the backoff applies.
    worker.started_at = time.monotonic()
    delays = [worker.schedule_restart(EXIT_DEVICE_LOST, 300) for _ in range(3)]
    assert delays == [BACKOFF_START, 2 * BACKOFF_START, 4 * BACKOFF_START]

    # A model that cannot load: the long, fixed wait, however long it ran.
    worker.started_at = time.monotonic()
    assert worker.schedule_restart(EXIT_LOAD_FAILED, 300) == 300
    assert worker.restart_at is not None and worker.restart_at >= time.monotonic() + 299

    api = Child("api", [])  # the API's exit statuses mean nothing special
    api.started_at = time.monotonic()
    assert api.schedule_restart(EXIT_LOAD_FAILED, 300) == BACKOFF_START


# --------------------------------------------------------------------------- real children


def test_crashes_back_off_and_a_model_that_cannot_load_is_retried_after_the_long_wait(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "d"
    data.mkdir()
    settings = Settings(data_dir=data, port=free_port(), model="stand-in", load_retry_seconds=1.0)
    supervisor = Supervisor(settings, [WorkerSlot("w0", "GPU-aaaa"), WorkerSlot("w1", None)])
    stand_in(supervisor, data, {"w0": "crash", "w1": "cannot-load"})
    supervisor.children[1].backoff = 0.3
    seen: dict[str, object] = {}

    def watch() -> None:
        # While w1 waits for its next try, its row says why and when.
        failed = wait_until(
            lambda: (row := rows(settings).get("w1")) and "; next try at " in row.detail and row,
            60,
            "w1's row to say why it failed and when it is tried again",
        )
        seen["w1 row"] = failed
        wait_until(lambda: len(starts(data, "w0")) >= 4 and len(starts(data, "w1")) >= 2, 60, "restarts")
        seen["processes"] = (data / "run" / "processes.json").read_text()

    assert supervise(supervisor, watch) == 0
    log = caplog.text

    crash_starts = starts(data, "w0")
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(crash_starts)]
    # Each wait at least its doubled backoff (0.3, 0.6, 1.2 s); a loaded machine only adds
    # process start-up time on top, so lower bounds hold however slow it is.
    assert all(gap >= 0.3 * 2**n for n, gap in enumerate(gaps[:3])), gaps
    assert "w0 crashed (exit status 1) after" in log and "restarting in" in log
    assert {entry for _, entry in crash_starts} == {"GPU-aaaa"}  # its GPU entry, as given

    load_starts = starts(data, "w1")
    assert load_starts[1][0] - load_starts[0][0] >= 1.0  # --load-retry-seconds, not the backoff
    assert "w1 could not load the model (exit status 3); trying again in 1 s" in log
    failed = seen["w1 row"]
    assert isinstance(failed, WorkerInfo) and failed.state == "failed"
    assert failed.detail.startswith("OSError: no weights in /nowhere; next try at ")  # the worker's reason
    assert failed.detail.endswith(" UTC")
    assert '"supervisor": ' in str(seen["processes"]) and '"w1": ' in str(seen["processes"])

    assert rows(settings)["w0"].state == "stopped"


def test_a_full_disk_never_takes_the_supervisor_or_the_api_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d"
    data.mkdir()
    settings = Settings(data_dir=data, port=free_port(), model="stand-in")
    supervisor = Supervisor(settings, [WorkerSlot("w0", None)])
    stand_in(supervisor, data, {"w0": "crash"})
    supervisor.children[1].backoff = 0.2

    def no_space(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    disk_full = threading.Event()
    disk_full.set()
    real_write_text, real_set_state = Path.write_text, SQLiteQueue.set_worker_state

    def write_text(path: Path, *args: object, **kwargs: object) -> int:
        if disk_full.is_set() and path.name == "processes.tmp":
            no_space()
        return real_write_text(path, *args, **kwargs)  # type: ignore[arg-type]

    def set_worker_state(queue: SQLiteQueue, *args: object, **kwargs: object) -> None:
        if disk_full.is_set():
            raise sqlite3.OperationalError("database or disk is full")
        real_set_state(queue, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(SQLiteQueue, "set_worker_state", set_worker_state)
    monkeypatch.setattr("prometheus_client.multiprocess.mark_process_dead", no_space)
    api = supervisor.children[0]

    def watch() -> None:
        wait_until(lambda: len(starts(data, "w0")) >= 3, 60, "the crashing worker's restarts")
        api_pid = api.pid
        url = f"http://127.0.0.1:{settings.port}/"
        assert httpx.get(url, timeout=5).status_code == 200  # the API still serves
        assert not (data / "run" / "processes.json").exists()
        disk_full.clear()  # space is back: the next writes succeed by themselves
        wait_until(lambda: (data / "run" / "processes.json").exists(), 30, "the pid file")
        wait_until(lambda: "w0" in rows(settings), 30, "w0's row")
        assert api.pid == api_pid  # never restarted

    assert supervise(supervisor, watch) == 0
    log = caplog.text
    assert "could not write" in log and "No space left on device" in log
    assert "could not remove the metrics of pid" in log
    assert "the queue cannot be written (database or disk is full)" in log
    assert "the queue is back after" in log


# --------------------------------------------------------------------------- PostgreSQL outage


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path_factory.mktemp("postgres-for-supervisor"))
    yield server
    remove(server)


def test_a_worker_that_exits_during_a_database_outage_is_restarted_and_its_job_released(
    tmp_path: Path, own_postgres: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The supervisor cannot release the exited worker's job while the database is down; it
    starts the worker again anyway (a worker restarted inside an outage waits for the queue),
    drops its pending release, and the successor gives its predecessor's job back before its
    own first claim: the job runs again once, and a late release never takes the successor's."""
    data = tmp_path / "d"
    data.mkdir()
    # Long leases: only a release can give the job back within this test.
    settings = Settings(
        data_dir=data,
        queue_url=own_postgres.fresh_database_url(),
        role="workers",
        box_name="box",
        model="stand-in",
        lease_seconds=600,
    )
    observer = open_queue(settings, role="test")
    job = observer.submit(Job(prompt="held through an outage", width=64, height=64, num_inference_steps=2))
    supervisor = Supervisor(settings, [WorkerSlot("box-w0", None)])
    stand_in(supervisor, data, {"box-w0": "claim-and-hold"})
    (worker,) = supervisor.children
    worker.backoff = 0.2
    claims = data / "box-w0.claims"

    def watch() -> None:
        wait_until(lambda: claims.exists(), 60, "the first claim")
        own_postgres.stop()
        try:
            (data / "box-w0.exit").touch()  # the worker exits while the database is down
            # Restarted inside the outage; the supervisor's release is handed to the successor.
            wait_until(lambda: len(starts(data, "box-w0")) == 2, 30, "the restart inside the outage")
            assert worker.process is not None
            assert not supervisor.queue_writes.pending_release("box-w0")
        finally:
            own_postgres.start()
        # Back: the successor releases the job, then claims it again.
        wait_until(lambda: len(claims.read_text().split("\n")) >= 3, 90, "the second claim")

    try:
        assert supervise(supervisor, watch) == 0
        first, second = (line.split() for line in claims.read_text().split("\n")[:2])
        assert first == [job.id, "1"] and second == [job.id, "2"]  # the same job, once more
        assert len(starts(data, "box-w0")) == 2
        log = caplog.text
        assert "the queue cannot be written (the queue database at" in log
        messages = [entry.message for entry in observer.get(job.id).logs]  # type: ignore[union-attr]
        assert messages.count("Worker lost; retrying") == 1
    finally:
        observer.close()


# --------------------------------------------------------------------------- start-up


def test_serve_refuses_a_busy_port_before_starting_workers(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "server.supervisor.cli", "serve", "--data-dir", str(tmp_path)]
        proc = subprocess.run(
            [*argv, "--port", str(port)], capture_output=True, text=True, timeout=60, cwd=REPO
        )
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "run" / "processes.json").exists()  # no child was started
