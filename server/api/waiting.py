"""Waiting on a job from route code: the one submit-and-wait and the one SSE loop.

Who may cancel a job when its client goes away:

- A synchronous caller (fal `/run`, fal `/run/.../stream`, OpenAI images) is the only one who
  will ever read the result: the response is the result. When it hangs up, or the server
  drops the connection at shutdown, the job is cancelled, so no GPU time goes into an image
  nobody receives (a queued job completes as cancelled at once, a running one stops at its
  next denoising step).
- A queued request (fal's queue API, BFL) lives on its own: watching its status stream is
  optional and several clients may do it, so a watcher that disconnects cancels nothing.
  That is fal's behaviour: only an explicit `PUT .../cancel` cancels a queued request.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request

from server import lifecycle
from server.api import tenancy
from server.api.idempotency import keyed
from server.jobs import Job, JobRecord, Status
from server.queue.aio import AsyncQueue
from server.queue.base import CancelOutcome

# Longest wait on the queue's change notification before the record is read again; also how
# often a waiting request checks whether its client is still connected.
WAIT_SLICE = 1.0
# Seconds between keep-alive comments on an idle event stream (fal: "every 15 seconds").
PING_INTERVAL = 15.0
EVENT_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class ClientGone(Exception):
    """The caller hung up before its job completed (the job was cancelled), or the record
    vanished (purged), so nobody is waiting for it any more."""


async def cancel_quietly(queue: AsyncQueue, request_id: str) -> None:
    """Cancel even while the surrounding task is being cancelled (a dropped connection)."""
    with anyio.CancelScope(shield=True):
        if await queue.cancel(request_id) is CancelOutcome.CANCELLED:
            record = await queue.get(request_id, with_logs=False)
            if record is not None:  # a running job is counted by its worker
                lifecycle.cancelled_in_queue(record)


async def submit_and_wait(request: Request, queue: AsyncQueue, job: Job) -> JobRecord:
    """Submit `job` for a synchronous caller and return its completed record; raises
    ClientGone (having cancelled the job) if the caller hangs up first. With an
    Idempotency-Key the job is the key's (a repeat waits on the first submit's job) and is
    not cancelled when the caller hangs up: a client that sends a key comes back for it."""
    submitted = await tenancy.submit(request, job)
    return await wait_until_completed(request, queue, submitted.record.id, cancel=not keyed(request))


async def wait_until_completed(
    request: Request, queue: AsyncQueue, request_id: str, *, cancel: bool = True
) -> JobRecord:
    """The synchronous caller's wait on a submitted job (see the module docstring); `cancel`
    False: a caller that hangs up leaves the job running."""
    completed = False
    try:
        async with aclosing(queue.watch(request_id, timeout=WAIT_SLICE, with_logs=False)) as changes:
            async for record, _ in changes:
                if record is None:
                    completed = True  # purged: there is nothing left to cancel
                    raise ClientGone
                if record.status is Status.COMPLETED:
                    completed = True
                    return record
                if await request.is_disconnected():
                    raise ClientGone
    finally:
        if not completed and cancel:
            await cancel_quietly(queue, request_id)
    raise AssertionError("unreachable: watch() never ends by itself")


@dataclass(frozen=True)
class StreamEvent:
    data: dict[str, Any]
    last: bool = False  # the stream ends after this event


# What to send for the record as it is now (and its queue position while queued): an event,
# or None when nothing the client has not seen yet changed.
EventRenderer = Callable[[JobRecord, int | None], StreamEvent | None]


async def event_stream(
    request: Request,
    queue: AsyncQueue,
    request_id: str,
    render: EventRenderer,
    *,
    with_logs: bool,
    cancel_on_disconnect: bool,
) -> AsyncIterator[str]:
    """Server-sent events for one request: `data: <json>` whenever `render` has something,
    `: ping` after PING_INTERVAL of silence; ends after the last event, when the record
    vanishes or when the client disconnects (then the job is cancelled if
    `cancel_on_disconnect`: a synchronous caller's stream)."""
    finished = False
    last_write = time.monotonic()
    try:
        async with aclosing(queue.watch(request_id, timeout=WAIT_SLICE, with_logs=with_logs)) as changes:
            async for record, position in changes:
                if record is None:  # purged while streaming
                    finished = True
                    return
                if await request.is_disconnected():
                    return
                event = render(record, position)
                if event is not None:
                    yield f"data: {json.dumps(event.data)}\n\n"
                    last_write = time.monotonic()
                    if event.last:
                        finished = True
                        return
                elif time.monotonic() - last_write >= PING_INTERVAL:
                    yield ": ping\n\n"
                    last_write = time.monotonic()
    finally:
        if cancel_on_disconnect and not finished:
            await cancel_quietly(queue, request_id)
