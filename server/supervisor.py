"""`flux-server serve`: the API process and the workers as supervised child processes.

    supervisor (this module; imports no torch)
      ├─ python -m server.cli api                         (restarted if it crashes)
      └─ python -m server.cli worker --worker-id w<i> [--gpu i]   (one per GPU, or one on CPU)

The children get the resolved settings through FLUX_* environment variables. A worker that
crashes is restarted with exponential backoff (1 s doubling to 30 s, reset after it ran
stably for a minute) and its leased job is released at once, so the job is retried without
waiting for the lease to run out. A worker that exits with code 2 could not load its model:
restarting it would fail the same way, so it stays down, marked "failed", and /health reports
the reason. SIGINT/SIGTERM stop the children (SIGTERM, then SIGKILL after a grace period) and
end with exit status 0.

The start-up checks that run before anything starts live in server/preflight.py. The pids of
the children are written to <data_dir>/run/processes.json for operators and tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.child_process import set_parent_death_signal
from server.config import Settings
from server.preflight import (
    EXIT_USAGE,
    ConfigError,
    StartupError,
    WorkerSlot,
    banner,
    base_url,
    check_model,
    check_port_free,
    check_settings,
    plan_workers,
)
from server.queue.base import JobQueue

logger = logging.getLogger("flux_server.supervisor")

WORKER_LOAD_FAILED = 2  # a worker's exit code when its model cannot be loaded
BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a child that ran this long gets its backoff reset
STOP_GRACE = 20.0  # seconds between SIGTERM and SIGKILL at shutdown
API_START_TIMEOUT = 60.0  # the first API process must listen within this, or serve gives up


# --------------------------------------------------------------------------- children


@dataclass
class Child:
    """One supervised process and its restart bookkeeping."""

    name: str  # "api" or a worker id
    argv: list[str]
    slot: WorkerSlot | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_START
    restart_at: float | None = None  # when a crashed child is due to start again
    failed: bool = False  # stays down (model load failure)
    restarts: int = 0
    ever_listened: bool = False  # API only: it accepted a connection once

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None


@dataclass
class Supervisor:
    settings: Settings
    slots: list[WorkerSlot]
    children: list[Child] = field(default_factory=list)
    queue: JobQueue | None = None
    stopping: bool = False

    def __post_init__(self) -> None:
        base = [sys.executable, "-m", "server.cli"]
        if self.settings.role != "workers":  # a workers-only box serves no HTTP
            self.children.append(Child("api", [*base, "api"]))
        for slot in self.slots:
            argv = [*base, "worker", "--worker-id", slot.worker_id]
            if slot.gpu is not None:
                argv += ["--gpu", str(slot.gpu)]
            self.children.append(Child(slot.worker_id, argv, slot=slot))
        # Every child writes its Prometheus samples into one directory, emptied per run.
        self.metrics_dir = self.settings.run_dir / "metrics"
        self._env = {
            **os.environ,
            **self.settings.to_env(),
            "PYTHONUNBUFFERED": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }

    # --- processes ---------------------------------------------------------------------
    def _start(self, child: Child) -> None:
        preexec = set_parent_death_signal if sys.platform.startswith("linux") else None
        child.process = subprocess.Popen(child.argv, env=self._env, preexec_fn=preexec)
        child.started_at = time.monotonic()
        child.restart_at = None
        logger.info("started %s (pid %d)", child.name, child.process.pid)
        self._write_pids()

    def _write_pids(self) -> None:
        info = {
            "supervisor": os.getpid(),
            "api": next((c.pid for c in self.children if c.slot is None), None),
            "workers": {c.name: c.pid for c in self.children if c.slot is not None},
        }
        path = self.settings.run_dir / "processes.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        tmp.replace(path)

    def _on_exit(self, child: Child, code: int) -> None:
        now = time.monotonic()
        ran = now - child.started_at
        if child.process is not None:
            self._forget_metrics_of(child.process.pid)
        child.process = None
        if child.slot is not None:
            released = self._release(child.name)
            if released:
                logger.warning("%s held %s; released for retry", child.name, ", ".join(released))
        if child.slot is not None and code == WORKER_LOAD_FAILED:
            child.failed = True
            logger.error(
                "%s could not load the model (exit status 2); not restarting it. Fix the model "
                "settings and restart flux-server.",
                child.name,
            )
            self._mark_worker(child, "failed", "the model could not be loaded (worker exit status 2)")
            return
        if child.slot is None and not child.ever_listened:
            # The API never came up (port in use, bad certificate...): retrying cannot help.
            raise StartupError(f"the API process exited with status {code} before it started listening")
        if ran >= STABLE_AFTER:
            child.backoff = BACKOFF_START
        delay = child.backoff
        child.backoff = min(child.backoff * 2, BACKOFF_MAX)
        child.restart_at = now + delay
        child.restarts += 1
        logger.warning(
            "%s exited with status %d after %.1f s; restarting in %.0f s (restart #%d)",
            child.name,
            code,
            ran,
            delay,
            child.restarts,
        )
        if child.slot is not None:
            self._mark_worker(child, "stopped", f"exited with status {code}; restarting in {delay:.0f} s")

    # --- queue ------------------------------------------------------------------------
    def _open_queue(self) -> None:
        from server.queue.factory import open_queue

        self.queue = open_queue(self.settings, role="supervisor")
        # Rows left by an earlier run with more workers would keep /health at 503 forever.
        planned = {slot.worker_id for slot in self.slots}
        # With a shared queue, only this box's rows are ours to clean up.
        own = f"{self.settings.box}-" if self.settings.shared_queue else ""
        for worker in self.queue.workers():
            stale = worker.state in ("stopped", "failed") and worker.worker_id.startswith(own)
            if worker.worker_id not in planned and stale:
                self.queue.remove_worker(worker.worker_id)

    def _release(self, worker_id: str) -> list[str]:
        if self.queue is None:
            return []
        try:
            return list(self.queue.release_worker(worker_id))
        except Exception:
            logger.exception("could not release the jobs of %s", worker_id)
            return []

    def _mark_worker(self, child: Child, state: str, detail: str) -> None:
        if self.queue is None or child.slot is None:
            return
        try:
            if state == "failed":
                # Keep the worker's own, more precise reason (e.g. the missing files).
                current = {w.worker_id: w for w in self.queue.workers()}.get(child.name)
                if current is not None and current.state == "failed" and current.detail:
                    return
            self.queue.set_worker_state(
                child.name, state, device=child.slot.device, model=self.settings.model, detail=detail
            )
        except Exception:
            logger.exception("could not record the state of %s", child.name)

    # --- main loop ----------------------------------------------------------------------
    def _api_listening(self) -> bool:
        host = self.settings.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1" if host != "::" else "::1"
        try:
            with socket.create_connection((host, self.settings.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _forget_metrics_of(self, pid: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, str(self.metrics_dir))

    def _clear_metrics(self) -> None:
        """Samples of an earlier run would count again (and its pids may be reused)."""
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.metrics_dir.glob("*.db"):
            stale.unlink(missing_ok=True)

    def run(self) -> int:
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        self._clear_metrics()
        self._open_queue()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
        }
        old_wakeup = signal.set_wakeup_fd(wake_w)
        api = next((child for child in self.children if child.slot is None), None)
        try:
            for child in self.children:
                self._start(child)
            api_deadline = time.monotonic() + API_START_TIMEOUT
            while not self.stopping:
                select.select([wake_r], [], [], self._sleep_time())
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                if self.stopping:
                    break
                if api is not None and not api.ever_listened and api.process is not None:
                    if self._api_listening():
                        api.ever_listened = True
                        logger.info("API listening on %s", base_url(self.settings))
                    elif time.monotonic() > api_deadline:
                        raise StartupError(f"the API did not listen within {API_START_TIMEOUT:.0f} s")
                self._reap_and_restart()
            return 0
        except StartupError as exc:
            print(f"flux-server: {exc}", file=sys.stderr)
            return 1
        finally:
            signal.set_wakeup_fd(old_wakeup)
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(wake_r)
            os.close(wake_w)
            if self.queue is not None:
                self.queue.close()

    def _sleep_time(self) -> float:
        """Until the next restart is due, at most half a second."""
        due = [c.restart_at for c in self.children if c.process is None and c.restart_at is not None]
        return max(0.0, min([0.5, *(t - time.monotonic() for t in due)]))

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM) and not self.stopping:
            self.stopping = True
            logger.info("received %s; stopping", signal.Signals(signum).name)

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.process is not None:
                code = child.process.poll()
                if code is not None:
                    self._on_exit(child, code)
            due = child.restart_at is not None and now >= child.restart_at
            if child.process is None and not child.failed and due:
                self._start(child)

    def _stop_all(self) -> None:
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + STOP_GRACE
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", child.name, STOP_GRACE)
                child.process.kill()
                child.process.wait()
        for child in self.children:
            if child.slot is not None:
                # A job a worker was still running goes back to the queue for the next start.
                self._release(child.name)
                if not child.failed:
                    self._mark_worker(child, "stopped", "flux-server stopped")
        logger.info("stopped")


# --------------------------------------------------------------------------- entry point


def serve(settings: Settings) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s", stream=sys.stderr
    )
    try:
        if settings.role != "workers":  # a workers-only box listens on no port
            check_settings(settings)
        settings = settings.model_copy(update={"data_dir": Path(settings.data_dir).resolve()})
        if settings.role != "api":  # an API-only box loads no model
            check_model(settings)
        slots = plan_workers(settings)
        # The children see the resolved count: the API reports ready only when all are.
        settings = settings.model_copy(update={"workers": len(slots)})
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError) as exc:
        print(f"flux-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if settings.role != "workers":
            check_port_free(settings)
    except StartupError as exc:
        print(f"flux-server: {exc}", file=sys.stderr)
        return 1
    print(banner(settings, slots), flush=True)
    return Supervisor(settings, slots).run()
