"""Accessors for the objects every route shares, and the base URL of returned links.

`create_app` puts `settings`, the queue, `storage` and `free_space` on `app.state`; routes read them
through these functions (usable directly or as FastAPI dependencies) rather than importing
globals, so that a test can build several apps side by side. Routes get the queue as an
`AsyncQueue`: route code runs on the event loop and must never wait on the store itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from server.config import Settings
from server.disk import FreeSpace
from server.queue.aio import AsyncQueue

if TYPE_CHECKING:  # the storage module belongs to another part of the tree
    from server.storage import Storage


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_queue(request: Request) -> AsyncQueue:
    return request.app.state.async_queue


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


def get_free_space(request: Request) -> FreeSpace:
    return request.app.state.free_space


def public_base_url(request: Request) -> str:
    """scheme://host[:port] that clients should use for every URL the server returns.

    `settings.public_url` wins when set. Otherwise the URL is derived from the request: the
    `Host` header and the scheme the connection arrived on. `X-Forwarded-Proto` and
    `X-Forwarded-Host` count only on connections from `--trusted-proxy` addresses (a
    TLS-terminating reverse proxy); from anyone else they are ignored, so a client cannot
    make the server hand out links to a host of its choosing.
    """
    settings = get_settings(request)
    if settings.public_url:
        return settings.public_url.rstrip("/")
    headers = request.headers
    scheme = request.scope.get("scheme", "http")
    host = headers.get("host")
    client = request.client.host if request.client else None
    if settings.is_trusted_proxy(client):
        scheme = _first(headers.get("x-forwarded-proto")) or scheme
        host = _first(headers.get("x-forwarded-host")) or host
    if not host:
        server = request.scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}"
    return f"{scheme}://{host}"


def _first(value: str | None) -> str | None:
    """The first item of a comma-separated forwarded header (the client-facing hop)."""
    if not value:
        return None
    return value.split(",", 1)[0].strip() or None
