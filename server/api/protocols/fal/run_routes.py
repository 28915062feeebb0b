"""fal's synchronous API (host fal.run): `POST /run/{owner}/{app}/{endpoint}` and `.../stream`.

A sync caller is just a submitter that waits: the job goes through the same queue and
workers as queued requests (same ordering, limits and metrics). A caller that hangs up
cancels its job (server/api/waiting.py says why). fal_client reaches these routes with
`FAL_RUN_HOST=<host>:<port>/run`; the JS client's proxy mode maps `https://fal.run/...` here
(see proxy.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.api import tenancy
from server.api.deps import get_queue, public_base_url
from server.api.idempotency import keyed
from server.api.protocols.fal import adapter, endpoints
from server.api.protocols.fal.queue_routes import request_job, require_fal_key, result_response
from server.api.waiting import EVENT_STREAM_HEADERS, ClientGone, StreamEvent, event_stream, submit_and_wait
from server.jobs import JobRecord, Status

router = APIRouter(prefix="/run", dependencies=[Depends(require_fal_key)], include_in_schema=False)

STREAM_SUFFIX = "/stream"
# No HTTP status reaches a client that has gone; 499 is nginx's name for that case in logs.
CLIENT_CLOSED = 499


@router.post("/{owner}/{app}/{endpoint:path}", response_model=None)
async def run(owner: str, app: str, endpoint: str, request: Request) -> Response:
    if endpoint.endswith(STREAM_SUFFIX):
        return await run_stream(owner, app, endpoint.removesuffix(STREAM_SUFFIX), request)
    if endpoint == STREAM_SUFFIX.lstrip("/") and not endpoints.is_endpoint(owner, app, endpoint):
        return await run_stream(owner, app, "", request)  # `/run/fal-ai/flux-lora/stream`
    job = await request_job(request, owner, app, endpoint)
    try:
        finished = await submit_and_wait(request, get_queue(request), job)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    request.state.fal_request_id = finished.id
    return result_response(request, finished)


def run_app(app: str) -> Callable[[str, Request], Awaitable[Response]]:
    """`POST /run/fal-ai/flux-lora` (and `/run/mystyle/flux-lora`): an app served at its own
    id (endpoint ""), one path per such app name (see queue_routes.submit_to_app)."""

    async def run_bare_app(owner: str, request: Request) -> Response:
        return await run(owner, app, "", request)

    return run_bare_app


for _app in endpoints.bare_app_names():
    router.add_api_route(f"/{{owner}}/{_app}", run_app(_app), methods=["POST"], response_model=None)


async def run_stream(owner: str, app: str, endpoint: str, request: Request) -> StreamingResponse:
    job = await request_job(request, owner, app, endpoint)
    queue = get_queue(request)
    record = (await tenancy.submit(request, job)).record  # a repeated Idempotency-Key: the first one's
    request.state.fal_request_id = record.id
    base_url = public_base_url(request)
    last_state: tuple | None = None
    logs_sent = 0

    def render(record: JobRecord, position: int | None) -> StreamEvent | None:
        """Progress events as JSON objects, then the full output (or the error body) last."""
        nonlocal last_state, logs_sent
        if record.status is Status.COMPLETED:
            if record.result is not None:
                return StreamEvent(adapter.output_body(record.result, base_url), last=True)
            final = adapter.error_parts(record.error)[1] if record.error else {}
            return StreamEvent(final, last=True)
        state = (record.status, position, record.progress, len(record.logs))
        if state == last_state:
            return None
        event = progress_event(record, position, logs_sent)
        last_state, logs_sent = state, len(record.logs)
        return StreamEvent(event)

    # A keyed stream's job outlives a dropped connection: its client streams it again.
    events = event_stream(
        request, queue, record.id, render, with_logs=True, cancel_on_disconnect=not keyed(request)
    )
    return StreamingResponse(events, media_type="text/event-stream", headers=EVENT_STREAM_HEADERS)


def progress_event(record: JobRecord, position: int | None, logs_sent: int) -> dict[str, Any]:
    event: dict[str, Any] = {"status": record.status.value, "request_id": record.id}
    if record.status is Status.IN_QUEUE:
        event["queue_position"] = position or 0
    else:
        event["progress"] = round(record.progress, 4)
        event["logs"] = [entry.model_dump() for entry in record.logs[logs_sent:]]
    return event
