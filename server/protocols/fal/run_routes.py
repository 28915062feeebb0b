"""fal's synchronous API (host fal.run): `POST /run/{owner}/{app}/{endpoint}` and `.../stream`.

A sync caller is just a submitter that waits: the job goes through the same queue and
workers as queued requests (same ordering, limits and metrics). A caller that hangs up
cancels its job. fal_client reaches these routes with `FAL_RUN_HOST=<host>:<port>/run`; the
JS client's proxy mode maps `https://fal.run/...` here (see proxy.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from server.auth import require_fal_key
from server.deps import get_queue, public_base_url
from server.jobs import JobRecord, Status
from server.protocols.fal import adapter
from server.protocols.fal.queue_routes import PING_INTERVAL, WAIT_SLICE, result_response, submit_request

router = APIRouter(prefix="/run", dependencies=[Depends(require_fal_key)], tags=["fal sync"])

STREAM_SUFFIX = "/stream"
# No HTTP status reaches a client that has gone; 499 is nginx's name for that case in logs.
CLIENT_CLOSED = 499


class ClientGone(Exception):
    pass


@router.post("/{owner}/{app}", response_model=None)
async def run_app(owner: str, app: str, request: Request) -> Response:
    """An app served at its own id (`fal-ai/flux-lora`): the endpoint is ""."""
    return await run(owner, app, "", request)


@router.post("/{owner}/{app}/{endpoint:path}", response_model=None)
async def run(owner: str, app: str, endpoint: str, request: Request) -> Response:
    if endpoint.endswith(STREAM_SUFFIX):
        return await run_stream(owner, app, endpoint.removesuffix(STREAM_SUFFIX), request)
    if endpoint == STREAM_SUFFIX.lstrip("/") and adapter.find_endpoint(f"{owner}/{app}", endpoint) is None:
        return await run_stream(owner, app, "", request)  # `/run/fal-ai/flux-lora/stream`
    record, _ = await submit_request(request, owner, app, endpoint)
    try:
        finished = await wait_until_completed(request, record.id)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return result_response(request, finished)


async def wait_until_completed(request: Request, request_id: str) -> JobRecord:
    """Wait for the job to complete; cancel it and raise ClientGone if the caller hangs up."""
    queue = get_queue(request)
    while True:
        if await request.is_disconnected():
            queue.cancel(request_id)
            raise ClientGone
        record = queue.get(request_id, with_logs=False)
        if record is None:
            raise ClientGone  # purged: nobody can be waiting for it any more
        if record.status is Status.COMPLETED:
            return record
        # No await between reading the record and waiting (the queue's contract).
        await queue.wait_for_change(request_id, timeout=WAIT_SLICE)


async def run_stream(owner: str, app: str, endpoint: str, request: Request) -> StreamingResponse:
    record, _ = await submit_request(request, owner, app, endpoint)
    return StreamingResponse(
        run_events(request, record.id),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def progress_event(record: JobRecord, position: int | None, logs_sent: int) -> dict[str, Any]:
    event: dict[str, Any] = {"status": record.status.value, "request_id": record.id}
    if record.status is Status.IN_QUEUE:
        event["queue_position"] = position or 0
    else:
        event["progress"] = round(record.progress, 4)
        event["logs"] = [entry.model_dump() for entry in record.logs[logs_sent:]]
    return event


async def run_events(request: Request, request_id: str) -> AsyncIterator[str]:
    """Progress events as JSON objects, then the full output (or the error body) last."""
    queue = get_queue(request)
    base_url = public_base_url(request)
    last_state: tuple | None = None
    last_write = time.monotonic()
    logs_sent = 0
    finished = False
    try:
        while not await request.is_disconnected():
            record = queue.get(request_id)
            if record is None:
                return
            if record.status is Status.COMPLETED:
                finished = True
                if record.result is not None:
                    final = adapter.output_body(record.result, base_url)
                else:
                    final = adapter.error_parts(record.error)[1] if record.error else {}
                yield f"data: {json.dumps(final)}\n\n"
                return
            position = queue.position(request_id) if record.status is Status.IN_QUEUE else None
            state = (record.status, position, record.progress, len(record.logs))
            if state != last_state:
                yield f"data: {json.dumps(progress_event(record, position, logs_sent))}\n\n"
                last_state, logs_sent, last_write = state, len(record.logs), time.monotonic()
                continue
            if time.monotonic() - last_write >= PING_INTERVAL:
                yield ": ping\n\n"
                last_write = time.monotonic()
                continue
            await queue.wait_for_change(request_id, timeout=WAIT_SLICE)
    finally:
        if not finished:
            queue.cancel(request_id)
