"""Usage per tenant, endpoint (app id) and UTC day: what the queue adds up as jobs complete.

Jobs rows are deleted after the retention time; usage rows are not, so the figures outlive
them. Each backend adds a job's figures in the transaction (or statement) that completes it,
so a job counts exactly once whatever path completes it (a worker, a cancel, a lost lease, a
start deadline): a completion retried after a lost acknowledgement finds the job completed
and adds nothing.

A completed job counts one request; a failed one (error, cancellation, timeout) also counts
in `failed` and adds no images. Sizes are kept in pixels (an integer: sums stay exact);
megapixels are computed when read. GPU seconds are the worker's inference time (the
result's `timings["inference"]`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from server.jobs import JobError, JobResult

# The tenant of jobs submitted without a named key, as stored (a primary key column cannot
# be NULL) and as labelled in metrics and reports.
NO_TENANT = ""
DEFAULT_TENANT_LABEL = "default"

# Both backends' sum over every day (the same SQL; `table` is the backend's usage table). The
# casts keep PostgreSQL's sums of BIGINT integers (not NUMERIC).
USAGE_TOTALS_SQL = (
    "SELECT '', tenant, app_id, CAST(SUM(requests) AS BIGINT), CAST(SUM(failed) AS BIGINT), "
    "CAST(SUM(images) AS BIGINT), CAST(SUM(pixels) AS BIGINT), SUM(gpu_seconds) "
    "FROM {table} GROUP BY tenant, app_id ORDER BY tenant, app_id"
)


@dataclass(frozen=True)
class Usage:
    """One job's contribution: a request, failed or not, with its images and GPU time."""

    failed: int
    images: int
    pixels: int
    gpu_seconds: float


@dataclass(frozen=True)
class UsageRow:
    """The sums of one (UTC day, tenant, app id)."""

    day: str  # YYYY-MM-DD, UTC
    tenant: str  # NO_TENANT: jobs of no named key
    app_id: str
    requests: int
    failed: int
    images: int
    pixels: int
    gpu_seconds: float

    @property
    def megapixels(self) -> float:
        return self.pixels / 1_000_000


def utc_day(unix_time: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(unix_time))


def usage_of(result: JobResult | None, error: JobError | None) -> Usage:
    """What completing a job with `result` (success) or `error` adds."""
    if result is None:
        return Usage(failed=1, images=0, pixels=0, gpu_seconds=0.0)
    return Usage(
        failed=0,
        images=len(result.images),
        pixels=sum(image.width * image.height for image in result.images),
        gpu_seconds=float(result.timings.get("inference", 0.0)),
    )


def tenant_label(tenant: str | None) -> str:
    """The tenant as reports and metrics name it."""
    return tenant or DEFAULT_TENANT_LABEL
