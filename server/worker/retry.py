"""Waiting out queue outages: capped exponential backoff, and one shared view of whether the
queue is reachable, so that an outage is logged once when it starts and once when it ends
however many threads run into it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from server.worker.faults import is_queue_outage

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_SECONDS = 0.5
MAX_DELAY_SECONDS = 15.0
# A worker asked to stop retries a queue write this long at most (the supervisor kills it
# STOP_GRACE = 20 s after SIGTERM); the job's lease then runs out and it is retried elsewhere.
STOPPING_PATIENCE_SECONDS = 10.0


class Backoff:
    """0.5 s, 1 s, 2 s ... at most 15 s; `reset` after a success."""

    def __init__(self, first: float = FIRST_DELAY_SECONDS, cap: float = MAX_DELAY_SECONDS) -> None:
        self.first, self.cap = first, cap
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class QueueOutage:
    """Whether this worker last found the queue unreachable. Every thread reports what it
    sees; `on_change(reason)` hears when an outage starts (`reason`) and ends (None)."""

    def __init__(self, on_change: Callable[[str | None], None] | None = None) -> None:
        self.on_change = on_change
        self._lock = threading.Lock()
        self._since: float | None = None

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException, doing: str) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        logger.warning("the queue is unavailable (%s while %s); waiting for it with backoff", exc, doing)
        if self.on_change is not None:
            self.on_change(f"the queue is unavailable: {exc}")

    def succeeded(self) -> None:
        if self._since is None:  # the common case: one attribute read, no lock
            return
        with self._lock:
            if self._since is None:
                return
            seconds, self._since = time.monotonic() - self._since, None
        logger.warning("the queue is reachable again after %.1f s", seconds)
        if self.on_change is not None:
            self.on_change(None)


def until_back(
    call: Callable[[], T],
    *,
    doing: str,
    outage: QueueOutage,
    stopping: threading.Event | None = None,
) -> T:
    """`call()`, retried with backoff for as long as the queue is unreachable. Once
    `stopping` is set it gives up after STOPPING_PATIENCE_SECONDS and raises the outage."""
    backoff = Backoff()
    give_up_at: float | None = None
    while True:
        try:
            result = call()
        except Exception as exc:
            if not is_queue_outage(exc):
                raise
            outage.failed(exc, doing)
            delay = backoff.next_delay()
            if stopping is not None and stopping.is_set():
                now = time.monotonic()
                give_up_at = give_up_at or now + STOPPING_PATIENCE_SECONDS
                if now >= give_up_at:
                    raise
                delay = min(delay, 1.0)
            time.sleep(delay)
            continue
        outage.succeeded()
        return result


def best_effort(
    call: Callable[[], T], default: T, *, doing: str, outage: QueueOutage, try_when_down: bool = False
) -> T:
    """`call()`, or `default` while the queue is unreachable. Unless `try_when_down`, not even
    tried once an outage is known: writes that only inform, such as progress, must not stall
    the device."""
    if outage.down and not try_when_down:
        return default
    try:
        return call()
    except Exception as exc:
        if not is_queue_outage(exc):
            raise
        outage.failed(exc, doing)
        return default
