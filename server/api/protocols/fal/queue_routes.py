"""fal's queue API (host queue.fal.run): submit, status, status stream, result, cancel.

Paths follow fal's queue API (docs/api/fal.md): submit uses the full model id
`/{owner}/{app}/{endpoint}`; status, result and cancel use only `/{owner}/{app}` and find the
request whatever endpoint it was submitted on. Trailing slashes are stripped by the app's
middleware before routing. Every response about a request carries `x-fal-request-id` (set
through `request.state.fal_request_id`, see server/api/request_ids.py). Status reads, waits and streams go
through the app's `AsyncQueue` (server/queue/aio.py), never blocking the event loop.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.convertors import StringConvertor, register_url_convertor

from server import lifecycle
from server.api import tenancy
from server.api.auth import KeyProblem, api_key_dependency
from server.api.deps import get_queue, get_settings, get_storage, public_base_url
from server.api.protocols.fal import adapter, endpoints
from server.api.protocols.fal.lifecycle import lifecycle_seconds
from server.api.variants import NOT_CONFIGURED, NOT_SERVED_STATUS, VariantNotServed, require_served
from server.api.waiting import EVENT_STREAM_HEADERS, StreamEvent, event_stream
from server.config import Settings
from server.jobs import Job, JobRecord, Status
from server.queue.base import CancelOutcome


def fal_key_refusal(problem: KeyProblem) -> HTTPException:
    if problem is KeyProblem.MISSING:
        detail = "Missing API key: send 'Authorization: Key <key>' or 'Authorization: Bearer <key>'"
    else:
        detail = "Invalid API key"
    return HTTPException(status_code=401, detail=detail)


require_fal_key = api_key_dependency(fal_key_refusal)


class FalOwner(StringConvertor):
    """fal's `{owner}` path segment: any segment but the first segment of this server's other
    routes, so that fal's patterns, which would match those routes' paths too, can be tried
    first. The app tries routes in order; a submit matched after the other 40 paid 0.05-0.1 ms
    of CPU for it (docs/benchmarks.md, "What changed"). tests/server/api/test_app.py checks
    that every other route starts with one of these."""

    RESERVED = (".well-known", "admin", "docs", "files", "health", "metrics", "openapi.json")
    RESERVED += ("redoc", "run", "static", "storage", "v1")
    regex = "(?!(?:" + "|".join(map(re.escape, RESERVED)) + ")(?:/|$))[^/]+"


register_url_convertor("fal_owner", FalOwner())

# Path patterns document nothing useful: server/api/protocols/fal/openapi.py describes each
# app and endpoint of the app table instead.
router = APIRouter(dependencies=[Depends(require_fal_key)], include_in_schema=False)
# A request's own routes (status, its stream, result, cancel): their fixed `requests` segment
# matches no other route, so the app includes them first and a status poll, the most frequent
# call, is routed without trying every other router.
request_router = APIRouter(dependencies=[Depends(require_fal_key)], include_in_schema=False)


def find_route(owner: str, app: str, endpoint: str, settings: Settings) -> endpoints.Route:
    """The endpoint's row and checkpoint; 404 for an unknown app or endpoint, and for one whose
    checkpoint this server does not serve (VariantNotServed, rendered by `variant_not_served`)."""
    try:
        route = endpoints.resolve(owner, app, endpoint)
    except LookupError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    require_served(settings, route.variant, f"'{route.model_id}'")
    return route


async def variant_not_served(request: Request, exc: Exception) -> JSONResponse:
    """fal's flat error shape (`detail`, `error_type`, and the x-fal-error-type header)."""
    assert isinstance(exc, VariantNotServed)
    return JSONResponse(
        {"detail": exc.message, "error_type": NOT_CONFIGURED},
        status_code=NOT_SERVED_STATUS,
        headers={"x-fal-error-type": NOT_CONFIGURED},
    )


async def request_job(request: Request, owner: str, app: str, endpoint: str) -> Job:
    """Validate a submit into its `Job`; shared by the queue and run routes."""
    settings = get_settings(request)
    route = find_route(owner, app, endpoint.strip("/"), settings)
    body = adapter.parse_body(await read_body(request))
    return await adapter.build_job(
        route=route,
        body=body,
        settings=settings,
        base_url=public_base_url(request),
        priority=adapter.parse_priority(request.headers.get("x-fal-queue-priority")),
        start_deadline=adapter.parse_start_deadline(
            request.headers.get("x-fal-request-timeout"), time.time()
        ),
        webhook=adapter.parse_webhook(request.query_params.get("fal_webhook"), settings),
        storage=get_storage(request),
        output_url_seconds=lifecycle_seconds(request),
    )


async def read_body(request: Request) -> bytes:
    """The raw body; one over the server's request-size limit fails with 413 while it is
    read (server/api/body_limit.py)."""
    return b"".join([chunk async for chunk in request.stream()])


async def find_record(
    request: Request, owner: str, app: str, request_id: str, *, with_logs: bool = False
) -> tuple[JobRecord, int | None] | None:
    """The fal request `request_id` of app `owner/app` and its queue position while queued,
    or None (unknown, another app's or another tenant's)."""
    request.state.fal_request_id = request_id
    record, position = await get_queue(request).get_with_position(request_id, with_logs=with_logs)
    # Another tenant's request is as unknown as a made-up id (server/api/tenancy.py).
    record = tenancy.owned(request, record)
    if record is None or not is_fal_request(record, owner, app):
        return None
    return record, position


def is_fal_request(record: JobRecord, owner: str, app: str) -> bool:
    return record.job.protocol == "fal" and record.job.app_id == f"{owner}/{app}"


async def require_record(
    request: Request, owner: str, app: str, request_id: str, *, with_logs: bool = False
) -> tuple[JobRecord, int | None]:
    found = await find_record(request, owner, app, request_id, with_logs=with_logs)
    if found is None:
        raise HTTPException(status_code=404, detail="Request not found")
    return found


def logs_requested(request: Request) -> bool:
    return request.query_params.get("logs", "").strip().lower() in ("1", "true", "yes")


def result_response(request: Request, record: JobRecord) -> JSONResponse:
    """The finished job as fal's result route answers it: output, or the error's status and body."""
    if record.result is not None:
        return JSONResponse(adapter.output_body(record.result, public_base_url(request)))
    if record.error is not None:
        status_code, body, headers = adapter.error_parts(record.error)
        return JSONResponse(body, status_code=status_code, headers=headers)
    raise HTTPException(status_code=400, detail="Request is still in progress")


@request_router.get("/{owner:fal_owner}/{app}/requests/{request_id}/status/stream")
async def status_stream(owner: str, app: str, request_id: str, request: Request) -> StreamingResponse:
    await require_record(request, owner, app, request_id)
    with_logs = logs_requested(request)
    base_url = public_base_url(request)
    last_sent: dict | None = None

    def render(record: JobRecord, position: int | None) -> StreamEvent | None:
        """Every change of the status body; the stream ends after COMPLETED."""
        nonlocal last_sent
        body = adapter.status_body(record, base_url, with_logs=with_logs, position=position)
        if body == last_sent:
            return None
        last_sent = body
        return StreamEvent(body, last=record.status is Status.COMPLETED)

    # A watcher that disconnects cancels nothing: the request is the queue's (server/api/waiting.py).
    events = event_stream(
        request, get_queue(request), request_id, render, with_logs=with_logs, cancel_on_disconnect=False
    )
    return StreamingResponse(events, media_type="text/event-stream", headers=EVENT_STREAM_HEADERS)


@request_router.get("/{owner:fal_owner}/{app}/requests/{request_id}/status")
async def status(owner: str, app: str, request_id: str, request: Request) -> JSONResponse:
    with_logs = logs_requested(request)
    record, position = await require_record(request, owner, app, request_id, with_logs=with_logs)
    body = adapter.status_body(record, public_base_url(request), with_logs=with_logs, position=position)
    return JSONResponse(body, status_code=200 if record.status is Status.COMPLETED else 202)


@request_router.put("/{owner:fal_owner}/{app}/requests/{request_id}/cancel")
async def cancel(owner: str, app: str, request_id: str, request: Request) -> JSONResponse:
    found = await find_record(request, owner, app, request_id)
    if found is None:
        return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
    outcome = await get_queue(request).cancel(request_id)
    if outcome is CancelOutcome.CANCELLED:  # a running job is counted by its worker
        lifecycle.cancelled_in_queue(found[0])
    if outcome in (CancelOutcome.CANCELLED, CancelOutcome.REQUESTED):
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)
    if outcome is CancelOutcome.ALREADY_COMPLETED:
        return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
    return JSONResponse({"status": "NOT_FOUND"}, status_code=404)


@request_router.get("/{owner:fal_owner}/{app}/requests/{request_id}")
async def result(owner: str, app: str, request_id: str, request: Request) -> JSONResponse:
    record, _ = await require_record(request, owner, app, request_id)
    if record.status is not Status.COMPLETED:
        # Not 408/409/429: fal_client retries those as if they were transient.
        raise HTTPException(status_code=400, detail="Request is still in progress")
    return result_response(request, record)


@router.post("/{owner:fal_owner}/{app}/{endpoint:path}")
async def submit(owner: str, app: str, endpoint: str, request: Request) -> JSONResponse:
    job = await request_job(request, owner, app, endpoint)
    submitted = await tenancy.submit(request, job)  # a repeated Idempotency-Key: the first one's
    record = submitted.record
    request.state.fal_request_id = record.id
    return JSONResponse(adapter.submit_body(record, record.job.base_url, submitted.position))


def submit_to_app(app: str) -> Callable[[str, Request], Awaitable[JSONResponse]]:
    """The route of an app served at its own id (`POST /fal-ai/flux-lora`, and a fine-tune's
    `POST /mystyle/flux-lora`: endpoint ""). One path per such app name, not an
    `/{owner}/{app}` pattern: that would answer 405 instead of 404 for every unknown
    two-segment GET."""

    async def submit_app(owner: str, request: Request) -> JSONResponse:
        return await submit(owner, app, "", request)

    return submit_app


for _app in endpoints.bare_app_names():
    router.add_api_route(f"/{{owner:fal_owner}}/{_app}", submit_to_app(_app), methods=["POST"])
