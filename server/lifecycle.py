r"""A request's lifecycle events, each recorded once: a Prometheus figure (server/metrics.py)
and one log line (server/logs.py) with the request id, the endpoint, the tenant (its key's
name; "default" for no named key) and the timings.

    submitted (API) -> started (worker) -> completed | failed (worker)
                    \-> cancelled while queued (API)
"""

from __future__ import annotations

import time

from server import metrics
from server.jobs import Job, JobError, JobRecord
from server.logs import event
from server.queue.usage import tenant_label


def endpoint_label(job: Job) -> str:
    """The path a request was submitted on: `fal-ai/flux/dev`, `bfl/flux-dev`..."""
    return f"{job.app_id}/{job.endpoint}" if job.endpoint else job.app_id


def outcome_label(error: JobError | None) -> str:
    return "success" if error is None else error.error_type


def submitted(record: JobRecord, position: int | None = None) -> None:
    extra = {} if position is None else {"queue_position": position}
    event(
        "submitted",
        record.id,
        endpoint_label(record.job),
        tenant=tenant_label(record.job.tenant),
        protocol=record.job.protocol,
        **extra,
    )


def started(record: JobRecord, worker_id: str) -> None:
    """A worker claimed the request."""
    endpoint = endpoint_label(record.job)
    wait = max(0.0, (record.started_at or time.time()) - record.created_at)
    metrics.queue_wait_seconds.labels(endpoint).observe(wait)
    event(
        "started",
        record.id,
        endpoint,
        tenant=tenant_label(record.job.tenant),
        worker=worker_id,
        queued_seconds=wait,
        attempt=record.attempts,
    )


def finished(
    record: JobRecord, error: JobError | None, *, inference: float | None = None, images: int = 0
) -> None:
    """A worker stored the request's result (`error` None) or failed it."""
    endpoint = endpoint_label(record.job)
    total = max(0.0, time.time() - record.created_at)
    metrics.requests_total.labels(endpoint, outcome_label(error)).inc()
    metrics.request_duration_seconds.labels(endpoint).observe(total)
    fields: dict[str, float | int | str] = {"total_seconds": total}
    if inference is not None:
        metrics.inference_seconds.labels(endpoint).observe(inference)
        fields["inference_seconds"] = inference
        if record.job.num_inference_steps > 0:
            per_step = inference / record.job.num_inference_steps
            metrics.denoising_step_seconds.labels(endpoint).observe(per_step)
            fields["step_seconds"] = per_step
    if images:
        metrics.images_generated_total.labels(endpoint).inc(images)
        fields["images"] = images
    if error is None:
        event("completed", record.id, endpoint, tenant=tenant_label(record.job.tenant), **fields)
    else:
        event(
            "failed",
            record.id,
            endpoint,
            tenant=tenant_label(record.job.tenant),
            error_type=error.error_type,
            **fields,
        )


def cancelled_in_queue(record: JobRecord) -> None:
    """A queued request was cancelled before any worker saw it."""
    endpoint = endpoint_label(record.job)
    metrics.requests_total.labels(endpoint, "request_cancelled").inc()
    event(
        "cancelled",
        record.id,
        endpoint,
        tenant=tenant_label(record.job.tenant),
        queued_seconds=max(0.0, time.time() - record.created_at),
    )


def recovered(record: JobRecord) -> None:
    """The queue's upkeep put the request back (its worker was lost) or failed it (a start
    deadline passed, or its worker was lost once more)."""
    endpoint = endpoint_label(record.job)
    if record.error is None:
        event(
            "requeued", record.id, endpoint, tenant=tenant_label(record.job.tenant), attempt=record.attempts
        )
        return
    metrics.requests_total.labels(endpoint, record.error.error_type).inc()
    total = max(0.0, time.time() - record.created_at)
    event(
        "failed",
        record.id,
        endpoint,
        tenant=tenant_label(record.job.tenant),
        error_type=record.error.error_type,
        total_seconds=total,
    )
