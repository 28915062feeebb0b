"""`flux-server serve`'s run loop: the API process and the workers as supervised children.

    supervisor (this package; imports no torch)
      ├─ python -m server.supervisor.cli api                      (restarted if it crashes)
      └─ python -m server.supervisor.cli worker --worker-id w<i> [--gpu <entry>]
                                                    (one per GPU, or one on the CPU)

The children get the resolved settings through FLUX_* environment variables. When a worker
exits, its leased jobs are released at once (retried without waiting for the lease to run
out) and it is started again as server/supervisor/children.py decides from its exit status;
a worker that could not load its model is "failed" in /health, with its reason and the time
of the next try, until then. SIGINT/SIGTERM stop the children (SIGTERM, then SIGKILL after a
grace period) and end with exit status 0.

The supervisor never dies of the outside world: a queue that cannot be reached (PostgreSQL
down, SQLite full) delays its writes (server/supervisor/queue_writes.py), and a full disk
under <data_dir>/run (the pid file, the metrics directory) is logged. The API and the other
workers keep running meanwhile. The pids of the children are written to
<data_dir>/run/processes.json for operators and tests.
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

from server.config import Settings
from server.exit_codes import EXIT_LOAD_FAILED, describe
from server.supervisor.children import Child
from server.supervisor.gpus import WorkerSlot
from server.supervisor.preflight import StartupError, base_url
from server.supervisor.queue_writes import QueueWrites, RowWrite

logger = logging.getLogger("flux_server.supervisor")

STOP_GRACE = 20.0  # seconds between SIGTERM and SIGKILL at shutdown
API_START_TIMEOUT = 60.0  # the first API process must listen within this, or serve gives up
CHILD_MODULE = "server.supervisor.cli"


@dataclass
class Supervisor:
    settings: Settings
    slots: list[WorkerSlot]
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    def __post_init__(self) -> None:
        base = [sys.executable, "-m", CHILD_MODULE]
        if self.settings.role != "workers":  # a workers-only box serves no HTTP
            self.children.append(Child("api", [*base, "api"]))
        for slot in self.slots:
            argv = [*base, "worker", "--worker-id", slot.worker_id]
            env = {}
            if slot.gpu is not None:
                argv += ["--gpu", slot.gpu]
                # The worker sets it too; here as well, so that nothing it imports first can
                # initialise CUDA on every GPU of the box.
                env["CUDA_VISIBLE_DEVICES"] = slot.gpu
            self.children.append(Child(slot.worker_id, argv, slot=slot, env=env))
        # Every child writes its Prometheus samples into one directory, emptied per run.
        self.metrics_dir = self.settings.run_dir / "metrics"
        self._env = {
            **os.environ,
            **self.settings.to_env(),
            "PYTHONUNBUFFERED": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        self.queue_writes = QueueWrites(self.settings, [slot.worker_id for slot in self.slots])

    # --- processes ---------------------------------------------------------------------
    def _start(self, child: Child) -> None:
        try:
            child.start(self._env)
        except OSError as exc:
            child.could_not_start(exc)
            return
        if child.is_worker:
            self.queue_writes.forget_row(child.name)  # the new process reports for itself
        logger.info("started %s (pid %d)", child.name, child.process.pid)  # type: ignore[union-attr]
        self._write_pids()

    def _write_pids(self) -> None:
        info = {
            "supervisor": os.getpid(),
            "api": next((c.pid for c in self.children if not c.is_worker), None),
            "workers": {c.name: c.pid for c in self.children if c.is_worker},
        }
        path = self.settings.run_dir / "processes.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(info, indent=1) + "\n")
            tmp.replace(path)
        except OSError as exc:  # a full disk: the file is for operators; serving goes on
            logger.error("could not write %s: %s", path, exc)

    def _on_exit(self, child: Child, code: int) -> None:
        pid = child.pid
        if pid is not None:
            self._forget_metrics_of(pid)
        if not child.is_worker and not child.ever_listened:
            # The API never came up (port in use, bad certificate...): retrying cannot help.
            child.process = None
            raise StartupError(f"the API process {describe(code)} before it started listening")
        ran = time.monotonic() - child.started_at
        delay = child.schedule_restart(code, self.settings.load_retry_seconds)
        if not child.is_worker:
            logger.warning("api %s after %.1f s; restarting in %.0f s", describe(code), ran, delay)
            return
        assert child.slot is not None
        self.queue_writes.release(child.name)
        if code == EXIT_LOAD_FAILED:
            next_try = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + delay))
            logger.error(
                "%s %s; trying again in %.0f s (--load-retry-seconds), at %s",
                child.name,
                describe(code),
                delay,
                next_try,
            )
            row = RowWrite(
                "failed", child.slot.device, describe(code), note=next_try, keep_worker_reason=True
            )
        else:
            logger.warning(
                "%s %s after %.1f s; restarting in %.0f s (restart #%d)",
                child.name,
                describe(code),
                ran,
                delay,
                child.restarts,
            )
            row = RowWrite("stopped", child.slot.device, f"{describe(code)}; restarting in {delay:.0f} s")
        self.queue_writes.set_row(child.name, row)
        if not self.queue_writes.flush(now=True):
            logger.warning("%s: its jobs go back to the queue once the queue answers again", child.name)

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

        try:
            mark_process_dead(pid, str(self.metrics_dir))
        except OSError as exc:
            logger.error("could not remove the metrics of pid %d: %s", pid, exc)

    def _clear_metrics(self) -> None:
        """Samples of an earlier run would count again (and its pids may be reused)."""
        try:
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.metrics_dir.glob("*.db"):
                stale.unlink(missing_ok=True)
        except OSError as exc:
            logger.error("could not clear %s: %s", self.metrics_dir, exc)

    def run(self) -> int:
        self._clear_metrics()
        self.queue_writes.flush(now=True)  # opens the queue; cleans up rows of an earlier run
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
        }
        old_wakeup = signal.set_wakeup_fd(wake_w)
        api = next((child for child in self.children if not child.is_worker), None)
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
                self.queue_writes.flush()
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
            self.queue_writes.close()

    def _sleep_time(self) -> float:
        """Until the next restart is due, at most half a second."""
        due = [c.restart_at for c in self.children if c.process is None and c.restart_at is not None]
        return max(0.0, min([0.5, *(t - time.monotonic() for t in due)]))

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM) and not self.stopping:
            self.stopping = True
            logger.info("received %s; stopping", signal.Signals(signum).name)

    def _reap_and_restart(self) -> None:
        for child in self.children:
            if child.process is not None:
                code = child.process.poll()
                if code is not None:
                    self._on_exit(child, code)
            due = child.restart_at is not None and time.monotonic() >= child.restart_at
            if child.process is None and due:
                # The successor releases what its predecessor held (a queue outage may have
                # kept the supervisor from it) before its first claim.
                self.queue_writes.hand_over_release(child.name)
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
            if child.slot is None:
                continue
            # A job a worker was still running goes back to the queue for the next start.
            self.queue_writes.release(child.name)
            if child.last_exit != EXIT_LOAD_FAILED or child in running:
                self.queue_writes.set_row(
                    child.name, RowWrite("stopped", child.slot.device, "flux-server stopped")
                )
        if not self.queue_writes.flush(now=True):
            logger.error(
                "could not release the workers' jobs: they go back to the queue when their leases "
                "run out (--lease-seconds %.0f)",
                self.settings.lease_seconds,
            )
        logger.info("stopped")
