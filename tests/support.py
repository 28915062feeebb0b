"""Helpers every test module shares: a free loopback port, waiting for a condition, and an
image whose header lies about its size.

Tests wait on conditions, never on fixed sleeps: `wait_until` polls a condition until it holds
(returning its value) and fails with `what` after a generous timeout.
"""

from __future__ import annotations

import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

POLL_INTERVAL = 0.02

# Outbound fetches (input image URLs, webhooks, LoRA URLs) never reach loopback by default
# (server/fetch.py). The suite's image, webhook and LoRA servers listen on loopback, so every
# server and policy the tests build opens it explicitly with this; the tests of the closed
# default build theirs without it.
LOOPBACK_OUTBOUND = ["127.0.0.0/8", "::1", "localhost"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition: Callable[[], T],
    timeout: float = 60.0,
    what: str = "condition",
    *,
    interval: float = POLL_INTERVAL,
) -> T:
    """Call `condition` until it returns something truthy and return that; AssertionError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` and whose pixel data is a few bytes: any
    attempt to decode it fails (image_load_error), so refusing it as too large shows that
    the header was checked first."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"x\x9c") + chunk(b"IEND", b"")


def link_tiny(data_dir: Path, tiny_model_dir: Path) -> None:
    """Link the session's tiny model and tiny variants into `data_dir` (no rebuild there)."""
    from models.variants.tiny import TINY_VARIANTS_DIRNAME

    for folder in (tiny_model_dir, tiny_model_dir.parent / TINY_VARIANTS_DIRNAME):
        link = data_dir / folder.name
        if not link.exists():
            link.symlink_to(folder, target_is_directory=True)


def error_body(response: Any) -> dict:
    """A 5xx answer's JSON body less its `request_id`, which must be the response's
    `x-request-id` (server/api/request_ids.py)."""
    body = dict(response.json())
    assert body.pop("request_id") == response.headers["x-request-id"], body
    return body
