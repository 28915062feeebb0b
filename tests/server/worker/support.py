"""What the worker tests share: a data directory on the session's tiny model, jobs, and a
`Worker` run in a thread whose process exits (watchdog, dying helper) are recorded instead
of ending pytest."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from models.runtime import FluxRuntime
from server.config import Settings
from server.jobs import Job, JobRecord, Status
from server.queue.base import JobQueue, QueueUnavailable
from server.worker import Worker
from tests.support import link_tiny, wait_until

REPO = Path(__file__).resolve().parents[3]


def make_data_dir(root: Path, tiny_model_dir: Path) -> Path:
    """A data directory that finds the session's tiny model and variants without rebuilding."""
    root.mkdir(parents=True, exist_ok=True)
    link_tiny(root, tiny_model_dir)
    return root


def completed(queue: JobQueue, request_id: str) -> Callable[[], JobRecord | None]:
    def check() -> JobRecord | None:
        record = queue.get(request_id)
        return record if record is not None and record.status is Status.COMPLETED else None

    return check


def job(**overrides: object) -> Job:
    return Job(**{"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 3, **overrides})


@dataclass
class ThreadWorker:
    """A worker in a thread of the test process. `exits`: the statuses it asked the process
    to exit with from a helper thread; `returned`: what `run` returned."""

    settings: Settings
    worker_id: str
    runtime: FluxRuntime | None = None  # an already loaded one, instead of loading again
    exits: list[int] = field(default_factory=list)
    returned: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.worker = Worker(self.settings, worker_id=self.worker_id, exit_process=self.exits.append)
        if self.runtime is not None:
            runtime = self.runtime
            self.worker._load = lambda: runtime  # type: ignore[method-assign]
        self.thread = threading.Thread(target=lambda: self.returned.append(self.worker.run()), daemon=True)

    def start(self, api: JobQueue, *, wait_ready: bool = True) -> ThreadWorker:
        self.thread.start()
        if wait_ready:
            wait_until(lambda: self.state(api) == "ready", 300, f"worker {self.worker_id} to be ready")
        return self

    def state(self, api: JobQueue) -> str | None:
        return {w.worker_id: w.state for w in api.workers()}.get(self.worker_id)

    def stop(self, timeout: float = 60) -> int:
        self.worker.stop()
        return self.join(timeout)

    def join(self, timeout: float = 60) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"worker {self.worker_id} did not end"
        (code,) = self.returned
        return code


def pause_at_step(
    runtime: FluxRuntime, monkeypatch, step: int = 1
) -> tuple[threading.Event, threading.Event]:
    """Make the next generations wait after denoising step `step` until `go` is set (a job
    held mid-run while the test breaks something); `reached` is set when one gets there."""
    reached, go = threading.Event(), threading.Event()
    original = runtime.generate

    def generate(request, on_step=None, should_cancel=None):  # type: ignore[no-untyped-def]
        def on_step_then_wait(i: int, total: int) -> None:
            if on_step is not None:
                on_step(i, total)
            if i == step:
                reached.set()
                assert go.wait(120), "the test never let the job go on"

        return original(request, on_step=on_step_then_wait, should_cancel=should_cancel)

    monkeypatch.setattr(runtime, "generate", generate)
    return reached, go


# Every queue method a worker calls: an injected outage makes all of them fail at once, as a
# database that went away does.
WORKER_QUEUE_METHODS = (
    "claim", "renew", "log", "is_cancel_requested", "complete", "fail", "requeue", "get", "set_worker_state",
)  # fmt: skip


class InjectedOutage:
    """While `down()` holds, each of the worker's queue calls raises QueueUnavailable (counted
    per method in `calls`, failed or not)."""

    def __init__(self, queue: JobQueue, monkeypatch, down: Callable[[], bool]) -> None:  # type: ignore[no-untyped-def]
        self.calls: dict[str, int] = dict.fromkeys(WORKER_QUEUE_METHODS, 0)
        self.down = down
        for name in WORKER_QUEUE_METHODS:
            monkeypatch.setattr(queue, name, self._wrap(name, getattr(queue, name)))

    def _wrap(self, name: str, real: Callable) -> Callable:
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls[name] += 1
            if self.down():
                raise QueueUnavailable(
                    "the queue database at db:5432/flux is unavailable: Connection refused"
                )
            return real(*args, **kwargs)

        return call


class CallsWhileGenerating:
    """Records the worker's queue calls made on the thread that runs `runtime.generate`, while
    it runs (`calls`, method names): the device's thread must make none, its steps and cancel
    flag go through memory (server/worker/progress.py). Also every queue call with the name of
    the thread that made it (`by_thread`: (thread name, method, args))."""

    def __init__(self, runtime: FluxRuntime, queue: JobQueue, monkeypatch) -> None:  # type: ignore[no-untyped-def]
        self.calls: list[str] = []
        self.by_thread: list[tuple[str, str, tuple, dict]] = []
        self.generations = 0
        self._inside: set[int] = set()  # threads inside runtime.generate
        original = runtime.generate

        def generate(*args, **kwargs):  # type: ignore[no-untyped-def]
            me = threading.get_ident()
            self._inside.add(me)
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.discard(me)
                self.generations += 1

        monkeypatch.setattr(runtime, "generate", generate)
        for name in WORKER_QUEUE_METHODS:
            monkeypatch.setattr(queue, name, self._wrap(name, getattr(queue, name)))

    def _wrap(self, name: str, real: Callable) -> Callable:
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            if threading.get_ident() in self._inside:
                self.calls.append(name)
            self.by_thread.append((threading.current_thread().name, name, args, kwargs))
            return real(*args, **kwargs)

        return call
