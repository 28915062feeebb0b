"""Cross-process wake-ups over AF_UNIX datagram sockets (no extra service, no polling loop).

Every process binds one datagram socket named `<role>-<pid>.sock` in the run directory.
`notify(role, payload)` sends a tiny datagram to every socket of that role; a datagram that
arrives while nobody waits stays in the socket's buffer, so a wake-up sent between "the queue
looked empty" and "start waiting" is not lost.

Workers block in `wait(timeout)`. The API process reads its socket from the asyncio loop
(`loop.add_reader`) and hands each payload key (a request id, or a name such as
`DELIVERIES_KEY`) to the coroutines waiting on it. A payload may hold several keys separated
by newlines. Datagrams can still be dropped (a full buffer), so every waiter also gives up
after a short fallback timeout and re-reads the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import select
import socket
import tempfile
import threading
from pathlib import Path

# Sun_path holds 108 bytes on Linux (104 on macOS); leave room for the file name.
_MAX_SOCKET_DIR = 80
_instance_numbers = itertools.count()


def socket_dir(run_dir: Path) -> Path:
    """The directory holding the sockets: `run_dir`, or a short stand-in under the temp dir
    when `run_dir` is too long for AF_UNIX. Every process derives the same stand-in."""
    run_dir = Path(run_dir).absolute()
    if len(str(run_dir)) <= _MAX_SOCKET_DIR:
        return run_dir
    digest = hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"flux-{digest}"


class Notifier:
    def __init__(self, run_dir: Path, role: str) -> None:
        self.dir = socket_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.role = role
        number = next(_instance_numbers)
        suffix = "" if number == 0 else f".{number}"
        self.path = self.dir / f"{role}-{os.getpid()}{suffix}.sock"
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left over by a dead process that had the same pid
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.path))
        self._sock.setblocking(False)
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._closed = False
        # asyncio side: key -> futures of the coroutines waiting for it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._lock = threading.Lock()

    # --- sending -------------------------------------------------------------------------
    def notify(self, role: str, payload: bytes = b"") -> None:
        """Send `payload` to every live socket of `role` (this process's own included)."""
        prefix = f"{role}-"
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            if not (name.startswith(prefix) and name.endswith(".sock")):
                continue
            target = os.path.join(self.dir, name)
            try:
                self._sender.sendto(payload, target)
            except (FileNotFoundError, BlockingIOError):
                # Gone meanwhile, or its buffer is full: it has wake-ups pending anyway.
                pass
            except ConnectionRefusedError:
                # Nobody is bound there any more: the process died without cleaning up.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
            except OSError:
                pass

    def wake_self(self) -> None:
        """Make a blocked `wait` return now (e.g. from a signal handler that asks to stop)."""
        with contextlib.suppress(OSError):
            self._sender.sendto(b"", str(self.path))

    # --- blocking side (workers) ---------------------------------------------------------
    def wait(self, timeout: float) -> list[bytes]:
        """Block until at least one datagram arrives or `timeout` passes; return (and drain)
        every pending payload. An empty list means the timeout passed."""
        if self._closed:
            return []
        readable, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        return self._drain() if readable else []

    def _drain(self) -> list[bytes]:
        payloads: list[bytes] = []
        while True:
            try:
                payloads.append(self._sock.recv(4096))
            except (BlockingIOError, InterruptedError):
                return payloads
            except OSError:
                return payloads

    # --- asyncio side (API) --------------------------------------------------------------
    async def wait_for(self, key: str, timeout: float) -> bool:
        """Wait until `key` is notified (True) or `timeout` passes (False)."""
        loop = asyncio.get_running_loop()
        self._attach(loop)
        future: asyncio.Future[None] = loop.create_future()
        waiters = self._waiters.setdefault(key, set())
        waiters.add(future)
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
            return bool(done)
        finally:
            waiters.discard(future)
            if not waiters:
                self._waiters.pop(key, None)
            future.cancel()

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the socket from `loop` (moving from an earlier loop, e.g. between tests)."""
        if self._loop is loop:
            return
        with self._lock:
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._sock.fileno())
            self._waiters.clear()
            loop.add_reader(self._sock.fileno(), self._on_readable)
            self._loop = loop

    def _on_readable(self) -> None:
        for payload in self._drain():
            for raw_key in payload.split(b"\n"):
                key = raw_key.decode("utf-8", "replace")
                for future in self._waiters.get(key, ()):
                    if not future.done():
                        future.set_result(None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sender.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
