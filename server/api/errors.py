"""Which protocol renders an error: a registry of path prefixes and error renderers.

Every protocol answers errors in its own shape (fal and FastAPI: `{"detail": ...}`; BFL:
`{"detail": [{loc, msg, type}]}`; OpenAI: `{"error": {...}}`). Errors raised inside a route
are the route's business, but some arise before any route runs (404 for an unknown path,
405, a validation error, an unexpected exception). For those the app asks this registry:
a protocol claims its path prefixes with `register_error_renderer` at set-up, and paths no
protocol claims get FastAPI's shapes, which are fal's.

A full disk (`server.disk.DiskFull`, or any error `is_disk_full` recognises) is answered 507
Insufficient Storage in the protocol's shape, never 500: the request was not stored.

Every answer rendered here carries the HTTP request's id (server/api/request_ids.py): a 500
from an unexpected exception is sent past the middleware that adds it elsewhere. The
exception's text goes to the log with that id, never into the body.

Nearly a leaf module: it imports only the leaves `server.disk` and `server.api.request_ids`,
so protocol packages can use it without importing the app.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.request_ids import request_id_of, stamp
from server.disk import DISK_FULL_MESSAGE, DiskFull, is_disk_full
from server.storage.base import StorageUnavailable

log = logging.getLogger("flux_server.api")

ErrorRenderer = Callable[[Request, Exception], Awaitable[Response]]
INSUFFICIENT_STORAGE = 507


def register_error_renderer(app: FastAPI, prefix: str, renderer: ErrorRenderer) -> None:
    """Render errors on paths starting with `prefix` with `renderer(request, exc)`.

    `exc` is a RequestValidationError, a starlette HTTPException or any other exception (then
    answer 500 in the protocol's shape). The longest matching prefix wins."""
    renderers: list[tuple[str, ErrorRenderer]] = app.state.error_renderers
    renderers.append((prefix, renderer))
    renderers.sort(key=lambda item: len(item[0]), reverse=True)


def install_error_handlers(app: FastAPI, *, unavailable: tuple[type[Exception], ...] = ()) -> None:
    """Route every error the app's handlers see through the registry.

    `unavailable`: exceptions that mean a backing service is down for now (the queue's
    database restarting, a bucket unreachable): answered 503 in the protocol's shape, logged
    without a traceback.
    `DiskFull` is answered 507 the same way."""
    app.state.error_renderers = []
    app.state.unavailable_errors = unavailable
    app.add_exception_handler(RequestValidationError, handle_error)
    app.add_exception_handler(StarletteHTTPException, handle_error)
    app.add_exception_handler(DiskFull, handle_error)
    for exc_type in unavailable:
        app.add_exception_handler(exc_type, handle_error)
    app.add_exception_handler(Exception, handle_error)


async def handle_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, request.app.state.unavailable_errors):
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        what = "Object storage" if isinstance(exc, StorageUnavailable) else "The queue"
        exc = StarletteHTTPException(503, detail=f"{what} is unavailable; retry shortly")
    elif is_disk_full(exc):
        cause = exc.__cause__ if isinstance(exc, DiskFull) and exc.__cause__ else exc
        log.warning("%s %s refused, the disk is full: %s", request.method, request.url.path, cause)
        exc = StarletteHTTPException(INSUFFICIENT_STORAGE, detail=DISK_FULL_MESSAGE)
    for prefix, renderer in request.app.state.error_renderers:
        if request.url.path.startswith(prefix):
            return stamp(await renderer(request, exc), request_id_of(request))
    return stamp(default_error(request, exc), request_id_of(request))


def log_unhandled(logger: logging.Logger, request: Request, exc: Exception) -> None:
    """An unexpected exception's one log line, with its traceback and the request's id."""
    request_id = request_id_of(request)
    logger.error(
        "unhandled error on %s %s (request id %s)",
        request.method,
        request.url.path,
        request_id,
        exc_info=exc,
        extra={"http_request_id": request_id},
    )


def default_error(request: Request, exc: Exception) -> Response:
    """FastAPI's error shapes (fal's too), with fal's error-type header on a 500."""
    if isinstance(exc, RequestValidationError):
        return JSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
    if isinstance(exc, StarletteHTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    log_unhandled(log, request, exc)
    return JSONResponse(
        {"detail": "Internal server error", "error_type": "internal_server_error"},
        status_code=500,
        headers={"x-fal-error-type": "internal_server_error"},
    )
