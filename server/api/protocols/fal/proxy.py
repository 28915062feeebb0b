"""JS client proxy mode: `/api/fal/proxy` routed on the `x-fal-target-url` header.

`@fal-ai/client` configured with `proxyUrl` sends every request to the proxy URL with the same
method, headers and body, and the real target in `x-fal-target-url` (for example
`https://queue.fal.run/fal-ai/flux/requests/<id>/status?logs=0`). This ASGI middleware
rewrites such a request's path and query to the local route that serves the target and hands
it on unchanged otherwise (method, body, headers, auth), so the queue and run routes answer it
exactly as they answer direct calls:

    https://queue.fal.run/<path>?<query>  ->  /<path>?<query>       (queue API)
    https://fal.run/<path>?<query>        ->  /run/<path>?<query>   (sync run and /stream)
    https://rest.fal.ai/storage/<path>    ->  /storage/<path>       (starting uploads)

Anything else, or no header, gets 400 "Invalid request" like fal's own server proxy.
"""

from __future__ import annotations

import json
from urllib.parse import unquote, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

PROXY_PATH = "/api/fal/proxy"
TARGET_HEADER = b"x-fal-target-url"
METHODS = frozenset({"GET", "POST", "PUT"})
# Target host -> prefix of the local route.
TARGET_HOSTS = {"queue.fal.run": "", "fal.run": "/run", "rest.fal.ai": ""}
# Of fal's REST API, only the storage routes exist here.
REST_HOST, REST_PATHS = "rest.fal.ai", "/storage/"


def local_target(target_url: str) -> tuple[str, str] | None:
    """(path, query) of the local route for a fal URL, or None if it is not one we serve."""
    parts = urlsplit(target_url.strip())
    if parts.scheme not in ("https", "http") or parts.hostname not in TARGET_HOSTS:
        return None
    if not parts.path.startswith("/") or parts.path == "/" or ".." in parts.path.split("/"):
        return None
    if parts.hostname == REST_HOST and not parts.path.startswith(REST_PATHS):
        return None
    return TARGET_HOSTS[parts.hostname] + parts.path, parts.query


class FalProxyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != PROXY_PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in METHODS:
            await reject(send, 405, "Method not allowed")
            return
        target = next((value for name, value in scope["headers"] if name == TARGET_HEADER), None)
        local = local_target(target.decode("latin-1")) if target else None
        if local is None:
            await reject(send, 400, "Invalid request")
            return
        path, query = local
        scope = dict(scope, path=unquote(path), raw_path=path.encode(), query_string=query.encode())
        await self.app(scope, receive, send)


async def reject(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
