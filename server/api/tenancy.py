"""Ownership and quotas on the API's side: every submit of every protocol goes through
`submit`, every read of a request through `owned`.

A submit is stamped with the caller's tenant (Job.tenant) and checked against its quotas;
over a limit it is refused with 429 and `Retry-After`, raised as an HTTPException that each
protocol renders in its own shape (server/api/errors.py). A request another tenant owns is
answered exactly as an unknown id (`owned` returns None), so a tenant cannot learn that it
exists; an admin sees every tenant's requests.
"""

from __future__ import annotations

import time

from fastapi import Request
from starlette.exceptions import HTTPException

from server import lifecycle, metrics
from server.api.auth import caller_of
from server.api.idempotency import store
from server.api.queued_counts import ActiveCount, QueuedCounts
from server.jobs import Job, JobRecord
from server.queue.idempotency import Submitted
from server.queue.usage import tenant_label
from server.tenants import Caller
from server.tenants.quotas import OverQuota, QuotaCounters, check_queued

TOO_MANY_REQUESTS = 429


def owned(request: Request, record: JobRecord | None) -> JobRecord | None:
    """`record` when the caller may see it, else None (the same answer as an unknown id)."""
    if record is None or not caller_of(request).owns(record.job.tenant):
        return None
    return record


def quota_counters(request: Request) -> QuotaCounters:
    return request.app.state.quota_counters


def queued_counts(request: Request) -> QueuedCounts:
    return request.app.state.queued_counts


def refusal(caller: Caller, over: OverQuota) -> HTTPException:
    metrics.quota_refusals_total.labels(tenant_label(caller.tenant), over.quota).inc()
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
    counts = queued_counts(request)
    active: ActiveCount | None = None
    over: OverQuota | None = None
    if caller.quotas.queued is not None:
        arrived = time.monotonic()
        active = await counts.count(caller.tenant)
        if check_queued(caller, active.value) is not None and active.read_at < arrived:
            active = await counts.count(caller.tenant, read_after=arrived)  # slots freed?
        # From here to the counting nothing awaits: the check and the count are one step of
        # the event loop, so a burst admits exactly up to the limit in this process.
        over = check_queued(caller, active.value)
    if over is None:
        over = quota_counters(request).check(caller, job.num_images)
    if over is not None:
        raise refusal(caller, over)
    if active is None:
        return await store(request, job)
    counts.admit(caller.tenant, active)
    try:
        return await store(request, job)
    finally:
        counts.stored(caller.tenant)
