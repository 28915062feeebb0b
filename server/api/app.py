"""App factory: one FastAPI app carrying every protocol, on one queue.

Routes are tried in order, and fal's, the most called (status polls, then submits), come
first. Their paths are patterns (`/{owner}/{app}/...`) that would also match `/v1/...` or
`/files/...`: fal's `{owner}` therefore never matches the first segment of another route
(`FalOwner` in server/api/protocols/fal/queue_routes.py), and the fixed-path routers (health,
files, the other protocol packages) follow in any order. The routes are added to the app's
own list (`add_routes`), not through `include_router`.

A protocol package's `routes` module exposes `router: APIRouter` and may expose `setup(app:
FastAPI) -> None` (called once, e.g. to register its error renderer with server/api/errors.py);
adding a protocol is one entry in `PROTOCOL_ROUTES`. Shared objects live on `app.state` (see
server/api/deps.py): `settings`, `queue` (the `JobQueue`, for background tasks), `async_queue`
(the same queue for route code: every call off the event loop, submits group-committed; see
server/queue/aio.py), `storage`, `free_space` (the disk's free-space floor, server/disk.py;
the async queue checks it before storing submits), plus:

- `app.state.background`: zero-argument coroutine functions started with the app and
  cancelled at shutdown (the webhook dispatcher is one).
- `app.state.error_renderers`: (path prefix, renderer) pairs; see server/api/errors.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.body_limit import BodyLimitMiddleware
from server.api.errors import install_error_handlers
from server.api.idempotency import FingerprintMiddleware
from server.api.maintenance import maintain_queue
from server.api.openapi import install_docs
from server.api.protocols.bfl import routes as bfl_routes
from server.api.protocols.bfl import webhook as bfl_webhook
from server.api.protocols.fal import queue_routes, run_routes
from server.api.protocols.fal import storage as fal_storage
from server.api.protocols.fal import webhook as fal_webhook
from server.api.protocols.fal.proxy import FalProxyMiddleware
from server.api.protocols.openai import routes as openai_routes
from server.api.queued_counts import QueuedCounts
from server.api.request_ids import RequestIdMiddleware
from server.api.routes import files, health, jwks, metrics, playground, usage
from server.api.variants import VariantNotServed
from server.api.webhooks.dispatch import start_dispatcher
from server.config import Settings
from server.disk import FreeSpace
from server.queue.aio import AsyncQueue
from server.queue.base import JobQueue, QueueUnavailable
from server.queue.factory import open_queue
from server.storage.base import StorageUnavailable
from server.storage.signing import UrlSigner, current_signer, load_signing_key
from server.tenants.keys import watcher_of
from server.tenants.quotas import QuotaCounters

log = logging.getLogger("flux_server.api")

# Fixed-path routers, included before fal's pattern routes (see the module docstring).
PROTOCOL_ROUTES = (jwks, bfl_routes, openai_routes)


def create_app(settings: Settings, *, queue: JobQueue | None = None) -> FastAPI:
    owns_queue = queue is None
    if queue is None:
        queue = open_queue(settings, role="api")
    from server.storage import open_storage

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current_signer.set(app.state.url_signer)  # the background tasks (webhooks) sign URLs too
        tasks = [asyncio.create_task(maintain_queue(queue, app.state.storage, settings))]
        tasks += [asyncio.create_task(run_forever(factory)) for factory in app.state.background]
        tasks.append(
            asyncio.create_task(app.state.queued_counts.warm(app.state.keys.ring().queued_tenants()))
        )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            async_queue.close()
            if owns_queue:
                queue.close()

    # Trailing slashes are stripped by middleware instead of answered with redirects.
    app = FastAPI(
        title="flux-server",
        version="0.1.0",
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url=None,  # served from the package's own assets: server/api/openapi.py
        redoc_url=None,
    )
    app.state.settings = settings
    # The keys in force, re-read when the keys file changes (a revoked key is refused within
    # seconds); the queue's fair-share weights follow them.
    app.state.keys = watcher_of(settings)
    app.state.keys.on_change(lambda ring: queue.set_tenant_weights(ring.weights()))
    app.state.queue = queue
    # Signs returned file URLs while auth is on (server/storage/signing.py).
    app.state.url_signer = UrlSigner(
        load_signing_key(settings.url_signing_key, settings.data_dir),
        settings.retention_seconds,
        active=lambda: app.state.keys.ring().enabled,
    )
    app.state.quota_counters = QuotaCounters()  # per-minute and per-day counts of this process
    app.state.storage = open_storage(settings)
    free_space = app.state.free_space = FreeSpace(settings.watched_disks, settings.min_free_disk_bytes)
    async_queue = app.state.async_queue = AsyncQueue(queue, admit=free_space.check)
    # Per tenant with a `queued` quota: its count as this process keeps it (server/api/queued_counts.py).
    app.state.queued_counts = QueuedCounts(async_queue.active_count)
    app.state.background = []
    install_error_handlers(app, unavailable=(QueueUnavailable, StorageUnavailable))
    # A fal endpoint whose checkpoint is not configured (OpenAI's routes render their own).
    app.add_exception_handler(VariantNotServed, queue_routes.variant_not_served)

    # fal's routes first: a request's own routes (status polls are the most frequent call),
    # then the submits. Their `{owner}` excludes the first segments of every other route.
    add_routes(app, queue_routes.request_router)
    add_routes(app, queue_routes.router)
    add_routes(app, run_routes.router)
    install_docs(app)
    for router in (playground.router, health.router, metrics.router, usage.router, files.router):
        add_routes(app, router)
    add_routes(app, fal_storage.router)  # fixed paths under /files and /storage
    for module in PROTOCOL_ROUTES:
        add_routes(app, module.router)
        if hasattr(module, "setup"):
            module.setup(app)
    renderers = {"fal": fal_webhook.webhook_renderer(settings), "bfl": bfl_webhook.render_webhook}
    app.state.background.append(start_dispatcher(settings, queue, renderers))

    # Added innermost first: the proxy rewrites the path, then the body limit applies to that
    # path, then slashes are stripped, then the request-id header is added on the way out.
    app.add_middleware(UrlSignerMiddleware, signer=app.state.url_signer)
    app.add_middleware(StripTrailingSlashMiddleware)
    # Inside the body limit: hashes only what it let through (a keyed submit's body).
    app.add_middleware(FingerprintMiddleware)
    # fal storage uploads (under /files/) have their own, larger limit (--max-upload-bytes).
    app.add_middleware(BodyLimitMiddleware, limit=settings.request_body_limit, exempt_prefix="/files/")
    app.add_middleware(FalProxyMiddleware)
    # Around all of the above: every answer they give carries the HTTP request's id.
    app.add_middleware(RequestIdMiddleware)
    if settings.cors_origin:
        # Outermost, so that preflights are answered before the proxy route sees them and
        # every answer (413s included) carries the headers a browser needs.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin,
            allow_methods=["GET", "HEAD", "POST", "PUT"],
            allow_headers=["*"],
            expose_headers=["x-fal-request-id", "x-request-id"],
            max_age=600,
        )
    return app


def add_routes(app: FastAPI, router: APIRouter) -> None:
    """Append `router`'s routes to the app's own list, in order, instead of `include_router`.
    Since FastAPI 0.137 an included router stays one more node of the route tree that every
    request walks, matching its routes twice: 0.15-0.25 ms of CPU per submit (docs/
    benchmarks.md, "What changed"). Each route already carries its router's prefix,
    dependencies and tags."""
    app.router.routes.extend(router.routes)


# --- background ---------------------------------------------------------------------------


async def run_forever(factory: Callable[[], Awaitable[None]]) -> None:
    """Run a background coroutine; restart it after a crash instead of losing it silently."""
    while True:
        try:
            await factory()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "background task %s crashed; restarting in 1 s", getattr(factory, "__name__", factory)
            )
            await asyncio.sleep(1.0)


# --- middleware ---------------------------------------------------------------------------


class StripTrailingSlashMiddleware:
    """`/status/` is `/status`: fal's SDK requests paths with a trailing slash."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            stripped = path.rstrip("/") or "/"
            scope = dict(scope, path=stripped)
            if scope.get("raw_path"):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        await self.app(scope, receive, send)


class UrlSignerMiddleware:
    """Every request renders file URLs with this app's signer (see server/storage/signing.py)."""

    def __init__(self, app: ASGIApp, signer: UrlSigner) -> None:
        self.app = app
        self.signer = signer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = current_signer.set(self.signer)
        try:
            await self.app(scope, receive, send)
        finally:
            current_signer.reset(token)
