"""One supervised child process of `flux-server serve`, and when it starts again after it exits.

Restart policy, by the worker's exit status (server/exit_codes.py):

- EXIT_LOAD_FAILED (3): the model could not load. Another try right away would fail the same
  way, but a transient out-of-memory or a weights mount that came back late is not forever:
  it starts again after `load_retry_seconds` (default 300 s).
- EXIT_DEVICE_LOST (4), EXIT_HUNG (5): a fresh process (a fresh CUDA context) fixes it: it
  starts again after FAST_RESTART_DELAY, without growing its backoff. If it does so again
  within STABLE_AFTER of its start, the GPU is probably broken: the exponential backoff
  applies, so that it cannot spin.
- anything else (a crash, a signal, a dead helper thread, too many failures in a row): the
  exponential backoff, 1 s doubling to 30 s, reset once a child ran stably for a minute.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from server.child_process import set_parent_death_signal
from server.exit_codes import EXIT_DEVICE_LOST, EXIT_HUNG, EXIT_LOAD_FAILED
from server.supervisor.gpus import WorkerSlot

logger = logging.getLogger("flux_server.supervisor")

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a child that ran this long gets its backoff reset
FAST_RESTART_DELAY = 1.0  # after a lost device or a hang: at once, but never in a tight loop
FRESH_PROCESS_FIXES = frozenset({EXIT_DEVICE_LOST, EXIT_HUNG})


@dataclass
class Child:
    """One supervised process and its restart bookkeeping."""

    name: str  # "api" or a worker id
    argv: list[str]
    slot: WorkerSlot | None = None  # None: the API
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's environment
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_START
    restart_at: float | None = None  # when an exited child is due to start again
    restarts: int = 0
    last_exit: int | None = None
    ever_listened: bool = False  # API only: it accepted a connection once

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def is_worker(self) -> bool:
        return self.slot is not None

    def start(self, base_env: Mapping[str, str]) -> None:
        """Start the process (raises OSError when it cannot be forked or executed)."""
        preexec = set_parent_death_signal if sys.platform.startswith("linux") else None
        self.process = subprocess.Popen(self.argv, env={**base_env, **self.env}, preexec_fn=preexec)
        self.started_at = time.monotonic()
        self.restart_at = None

    def schedule_restart(self, code: int, load_retry_seconds: float) -> float:
        """After the process ended with `code`: when to start it again (see the module's
        docstring). Returns the delay in seconds."""
        now = time.monotonic()
        ran = now - self.started_at
        self.process = None
        self.last_exit = code
        if ran >= STABLE_AFTER:
            self.backoff = BACKOFF_START
        if code == EXIT_LOAD_FAILED and self.is_worker:
            delay = load_retry_seconds
        elif code in FRESH_PROCESS_FIXES and self.is_worker and ran >= STABLE_AFTER:
            delay = FAST_RESTART_DELAY
        else:
            delay = self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.restart_at = now + delay
        self.restarts += 1
        return delay

    def could_not_start(self, exc: OSError) -> None:
        """Popen failed (no memory to fork, a full process table): try again with backoff."""
        delay = self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.restart_at = time.monotonic() + delay
        logger.error("could not start %s (%s); trying again in %.0f s", self.name, exc, delay)
