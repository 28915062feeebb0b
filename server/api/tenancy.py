"""Ownership and quotas on the API's side: every submit of every protocol goes through
`submit`, every read of a request through `owned`.

A submit is stamped with the caller's tenant (Job.tenant) and checked against its quotas;
over a limit it is refused with 429 and `Retry-After`, raised as an HTTPException that each
protocol renders in its own shape (server/api/errors.py). A request another tenant owns is
answered exactly as an unknown id (`owned` returns None), so a tenant cannot learn that it
exists; an admin sees every tenant's requests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

from fastapi import Request
from starlette.exceptions import HTTPException

from server import lifecycle
from server.api.auth import caller_of
from server.api.deps import get_queue
from server.api.idempotency import store
from server.jobs import Job, JobRecord
from server.queue.idempotency import Submitted
from server.tenants import Caller
from server.tenants.quotas import OverQuota, QuotaCounters, check_queued

log = logging.getLogger("flux_server.api")

TOO_MANY_REQUESTS = 429
# How long a tenant's count of queued and running requests, read for one admission, serves
# the next ones in this process without a new read (see `active_count`), and how long, once
# older, it still serves them while a new read runs.
ACTIVE_COUNT_REUSE_SECONDS = 0.05
ACTIVE_COUNT_STALE_SECONDS = 1.0


def owned(request: Request, record: JobRecord | None) -> JobRecord | None:
    """`record` when the caller may see it, else None (the same answer as an unknown id)."""
    if record is None or not caller_of(request).owns(record.job.tenant):
        return None
    return record


def quota_counters(request: Request) -> QuotaCounters:
    return request.app.state.quota_counters


def in_flight(request: Request) -> Counter[str | None]:
    """Submits per tenant admitted by this process and not yet stored: the queue's count does
    not hold them yet, so a burst cannot slip past the `queued` limit in between."""
    return request.app.state.submits_in_flight


@dataclass
class ActiveCount:
    """A tenant's queued-and-running count as this process last read it from the queue, plus
    what this process admitted since."""

    value: int
    read_at: float


def active_counts(request: Request) -> dict[str | None, ActiveCount]:
    return request.app.state.active_counts


async def active_count(request: Request, tenant: str | None, *, read_after: float = -math.inf) -> ActiveCount:
    """The tenant's count for an admission (read at or after `read_after`, a monotonic time).

    A count read less than `ACTIVE_COUNT_REUSE_SECONDS` ago serves as it is. An older one,
    up to `ACTIVE_COUNT_STALE_SECONDS`, serves too while a new read runs in the background:
    a burst of submits pays one count query per interval and no submit waits for it
    (measured: a count query per submit, serialized by a lock, added 50 to 80 % to a
    1000-submit burst; making each submit wait for the interval's read, another 10 %). Only
    without a usable count does a submit wait, and all the submits waiting for one read wake
    together when it ends. A reused count misses other processes' admissions since it was
    read (the race the docs state for several processes) and jobs finished since:
    `_submit_within_quotas` refuses only on a count read after the submit arrived."""
    known = active_counts(request).get(tenant)
    now = time.monotonic()
    if known is not None and known.read_at >= read_after:
        age = now - known.read_at
        if age < ACTIVE_COUNT_REUSE_SECONDS:
            return known
        if age < ACTIVE_COUNT_STALE_SECONDS:
            _count_read(request, tenant, now, read_after)
            return known
    await asyncio.shield(_count_read(request, tenant, now, read_after))
    # The newest count, which may be newer than the read awaited (reads overlap): every
    # admission must add to the one count later submits see.
    return active_counts(request)[tenant]


def _count_read(
    request: Request, tenant: str | None, now: float, read_after: float
) -> asyncio.Future[ActiveCount]:
    """The read of the tenant's count in progress, or a new one when none is, or when the one
    in progress started before `read_after`. A failed read is never kept: the submits waiting
    for it fail with its error, and the next submit reads again."""
    reads: dict[str | None, tuple[float, asyncio.Future[ActiveCount]]] = request.app.state.count_reads
    started, read = reads.get(tenant, (-math.inf, None))
    if read is not None and started >= read_after:
        return read
    read = asyncio.ensure_future(_read_active_count(request, tenant, now))
    reads[tenant] = (now, read)

    def done(read: asyncio.Future[ActiveCount]) -> None:
        if reads.get(tenant, (0, None))[1] is read:
            reads.pop(tenant)
        if not read.cancelled() and read.exception() is not None:  # retrieved: no asyncio warning
            log.debug("count read for tenant %r failed: %s", tenant, read.exception())

    read.add_done_callback(done)
    return read


async def _read_active_count(request: Request, tenant: str | None, read_at: float) -> ActiveCount:
    # What this process admitted and may not have stored by the time the query runs: the
    # submits in flight now, and those admitted while it runs. One stored before the query
    # is counted twice (a refusal a little early, never an admission too many).
    admitted = admissions(request)
    in_flight_before, admitted_before = in_flight(request)[tenant], admitted[tenant]
    stored = await get_queue(request).active_count(tenant)
    read = ActiveCount(stored + in_flight_before + admitted[tenant] - admitted_before, read_at)
    counts = active_counts(request)
    newest = counts.get(tenant)
    if newest is None or newest.read_at <= read_at:  # reads may overlap: keep the newest
        counts[tenant] = read
    return read


def admissions(request: Request) -> Counter[str | None]:
    """Submits admitted by this process under a `queued` quota, ever (per tenant)."""
    return request.app.state.admissions


def refusal(over: OverQuota) -> HTTPException:
    return HTTPException(
        TOO_MANY_REQUESTS, detail=over.message, headers={"Retry-After": str(over.retry_after)}
    )


async def submit(request: Request, job: Job) -> Submitted:
    """The one submit of every protocol's routes: stamp `job` with the caller's tenant, check
    its quotas, store it (a repeated Idempotency-Key: the key's job, nothing stored)."""
    caller = caller_of(request)
    if job.tenant != caller.tenant:
        job = job.model_copy(update={"tenant": caller.tenant})
    if caller.quotas.unlimited:  # the common case costs nothing more than before
        submitted = await store(request, job)
    else:
        submitted = await _submit_within_quotas(request, caller, job)
    if not submitted.repeated:
        lifecycle.submitted(submitted.record, submitted.position)
    return submitted


async def _submit_within_quotas(request: Request, caller: Caller, job: Job) -> Submitted:
    # A repeated Idempotency-Key is admitted like a new submit (and counted): the quotas are
    # checked before the queue says whether the key was seen.
    pending = in_flight(request)
    active: ActiveCount | None = None
    over: OverQuota | None = None
    if caller.quotas.queued is not None:
        arrived = time.monotonic()
        active = await active_count(request, caller.tenant)
        if check_queued(caller, active.value) is not None and active.read_at < arrived:
            active = await active_count(request, caller.tenant, read_after=arrived)  # slots freed?
        # From here to the counting nothing awaits: the check and the count are one step of
        # the event loop, so a burst admits exactly up to the limit in this process.
        over = check_queued(caller, active.value)
    if over is None:
        over = quota_counters(request).check(caller, job.num_images)
    if over is not None:
        raise refusal(over)
    if active is not None:
        active.value += 1
        admissions(request)[caller.tenant] += 1
    pending[caller.tenant] += 1  # admitted: counted until the queue holds it
    try:
        return await store(request, job)
    finally:
        pending[caller.tenant] -= 1
