"""Wake-ups across boxes with LISTEN/NOTIFY.

Every change the queue commits sends `NOTIFY flux_queue, '<key>\\n<key>...'` in its own
transaction (so a notification arrives only once the change is visible): a request id for a
changed request, `SUBMIT_KEY` when jobs were queued, `DELIVERIES_KEY` when a webhook became
due, `WORKERS_KEY` when a worker changed. Each process keeps one listening connection on a
thread, which wakes blocked claims (a generation counter, so a notification between "the
queue looked empty" and "start waiting" is not lost) and asyncio waiters of a key. If the
connection drops, the thread reconnects by itself; meanwhile every waiter still gives up
after a slow fallback poll and re-reads the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import psycopg

from server.queue.postgres.connection import connect

logger = logging.getLogger(__name__)

CHANNEL = "flux_queue"
SUBMIT_KEY = "submit"
DELIVERIES_KEY = "deliveries"
WORKERS_KEY = "workers"
RECONNECT_DELAY_SECONDS = 0.5
LISTEN_READY_TIMEOUT = 5.0


class Wakeups:
    def __init__(self, url: str) -> None:
        self.url = url
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._conn: psycopg.Connection | None = None
        # Blocked claims: a generation bumped on every submit (or reconnect, or interrupt).
        self._submits = threading.Condition()
        self._submit_generation = 0
        # asyncio waiters: key -> futures, each with its own loop.
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._waiters_lock = threading.Lock()

    # --- the listening thread ------------------------------------------------------------
    def start(self) -> None:
        """Start listening (once); wait briefly until LISTEN is in effect."""
        self.start_in_background()
        self._listening.wait(LISTEN_READY_TIMEOUT)

    def _listen_forever(self) -> None:
        while not self._closed.is_set():
            try:
                conn = connect(self.url, autocommit=True)
            except Exception as exc:
                logger.warning("queue notifications: %s; retrying", exc)
                self._closed.wait(RECONNECT_DELAY_SECONDS)
                continue
            self._conn = conn
            try:
                conn.execute(f"LISTEN {CHANNEL}")
                self._listening.set()
                self._wake_everyone()  # anything may have changed while nobody listened
                while not self._closed.is_set():
                    for notify in conn.notifies(timeout=1.0):
                        self._dispatch(notify.payload.split("\n"))
            except psycopg.Error as exc:
                if not self._closed.is_set():
                    logger.warning("queue notifications lost (%s); reconnecting", str(exc).strip())
            finally:
                self._listening.clear()
                self._conn = None
                with contextlib.suppress(Exception):
                    conn.close()
            self._closed.wait(RECONNECT_DELAY_SECONDS)

    def _dispatch(self, keys: list[str]) -> None:
        if SUBMIT_KEY in keys:
            self.bump_submits()
        with self._waiters_lock:
            woken = [waiter for key in keys for waiter in self._waiters.get(key, ())]
        for loop, future in woken:
            with contextlib.suppress(RuntimeError):  # a loop closed meanwhile
                loop.call_soon_threadsafe(_resolve, future)

    def _wake_everyone(self) -> None:
        self.bump_submits()
        with self._waiters_lock:
            woken = [waiter for waiters in self._waiters.values() for waiter in waiters]
        for loop, future in woken:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, future)

    # --- blocking side (claims) ----------------------------------------------------------
    def submit_generation(self) -> int:
        with self._submits:
            return self._submit_generation

    def bump_submits(self) -> None:
        with self._submits:
            self._submit_generation += 1
            self._submits.notify_all()

    def wait_for_submit(self, generation: int, timeout: float) -> None:
        """Block until the generation moves past `generation`, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._submits:
            while self._submit_generation == generation and not self._closed.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._submits.wait(remaining)

    # --- asyncio side ---------------------------------------------------------------------
    async def wait_for(self, key: str, timeout: float) -> bool:
        """Wait until `key` is notified (True) or `timeout` passes (False)."""
        self.start_in_background()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = (loop, future)
        with self._waiters_lock:
            self._waiters.setdefault(key, set()).add(entry)
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
            return bool(done)
        finally:
            with self._waiters_lock:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(entry)
                    if not waiters:
                        del self._waiters[key]
            future.cancel()

    def start_in_background(self) -> None:
        """Like `start`, without waiting (never blocks an event loop)."""
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._closed.is_set():
                    self._thread = threading.Thread(
                        target=self._listen_forever, name="queue-listen", daemon=True
                    )
                    self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self.bump_submits()
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.cancel_safe()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
