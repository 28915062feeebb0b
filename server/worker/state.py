"""The worker's row in the queue's registry (what /health shows), written by its own thread.

`set` never blocks and never fails: the thread writes the latest state, retrying with backoff
while the queue is unreachable, so that a database outage neither stalls the caller nor
turns into a model "load failure", and an older state can never land after a newer one.
While the queue is unreachable the detail says so (`note`), and says so in the row as soon as
a write gets through.
"""

from __future__ import annotations

import threading

from server.queue.base import JobQueue
from server.worker.faults import is_queue_outage
from server.worker.retry import Backoff, QueueOutage


class StateRecorder:
    def __init__(self, queue: JobQueue, worker_id: str, model: str, outage: QueueOutage) -> None:
        self.queue, self.worker_id, self.model, self.outage = queue, worker_id, model, outage
        self.state, self.detail, self.device = "loading", "", ""
        self._note: str | None = None
        self._cond = threading.Condition()
        self._version = 0  # bumped by every change
        self._written = 0  # the version last written
        self._closed = False

    def set(self, state: str, detail: str = "", *, device: str | None = None) -> None:
        with self._cond:
            self.state, self.detail = state, detail
            if device is not None:
                self.device = device
            self._changed()

    def note(self, note: str | None) -> None:
        """A temporary remark shown before the detail (None removes it): the queue outage."""
        with self._cond:
            self._note = note
            self._changed()

    def _changed(self) -> None:
        self._version += 1
        self._cond.notify_all()

    def wait_written(self, timeout: float) -> bool:
        """Wait until the latest state is in the queue (or `timeout`); whether it is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._written >= self._version, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def run(self) -> None:
        """The writer thread: until `close`, write each new version once it can."""
        backoff = Backoff()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._written < self._version or self._closed)
                if self._written >= self._version:
                    return
                version = self._version
                state, device = self.state, self.device
                detail = self.detail if self._note is None else f"{self._note}; {self.detail}".rstrip("; ")
            try:
                self.queue.set_worker_state(
                    self.worker_id, state, device=device, model=self.model, detail=detail
                )
            except Exception as exc:
                if not is_queue_outage(exc):
                    raise
                self.outage.failed(exc, "recording the worker's state")
                with self._cond:  # a `close` cuts the wait short; the loop then tries once more
                    if self._closed:
                        return
                    self._cond.wait(backoff.next_delay())
                continue
            backoff.reset()
            self.outage.succeeded()
            with self._cond:
                self._written = max(self._written, version)
                self._cond.notify_all()
