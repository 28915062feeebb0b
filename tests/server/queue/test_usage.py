"""Usage per tenant, app id and UTC day (server/queue/usage.py), on every backend: added as
jobs complete on every path, exact sizes, failures counted as requests only, kept after the
purge."""

from __future__ import annotations

import time
from dataclasses import astuple

from server.jobs import JobError, JobResult, OutputImage
from server.queue.base import CancelOutcome, JobQueue
from server.queue.usage import UsageRow, utc_day
from tests.server.queue.conftest import make_job


def result_of(*sizes: tuple[int, int], inference: float) -> JobResult:
    images = [
        OutputImage(width=w, height=h, content_type="image/png", file_name=f"{n}.png", file_size=1)
        for n, (w, h) in enumerate(sizes)
    ]
    return JobResult(
        images=images,
        seed=1,
        prompt="p",
        has_nsfw_concepts=[False] * len(images),
        nsfw_checked=False,
        timings={"inference": inference, "store": 9.0},
        preset="none",
    )


def run(api: JobQueue, worker: JobQueue, tenant: str | None, app_id: str, result: JobResult) -> str:
    request_id = api.submit(make_job(tenant=tenant, app_id=app_id)).id
    claimed = worker.claim("w1", timeout=0)
    assert claimed is not None and claimed.id == request_id
    assert worker.complete(request_id, "w1", result)
    return request_id


def test_completions_add_requests_images_pixels_and_gpu_seconds_per_tenant_and_app(
    api: JobQueue, worker: JobQueue
) -> None:
    today = utc_day(time.time())
    assert api.usage() == []
    run(api, worker, "acme", "fal-ai/flux", result_of((1024, 768), (512, 512), inference=1.5))
    again = run(api, worker, "acme", "fal-ai/flux", result_of((64, 48), inference=0.25))
    run(api, worker, None, "bfl/flux-dev", result_of((1024, 1024), inference=2.0))
    # A retried completion (a lost acknowledgement) adds nothing.
    assert worker.complete(again, "w1", result_of((64, 48), inference=0.25))

    rows = api.usage(today, today)
    assert rows == [
        UsageRow(today, "", "bfl/flux-dev", 1, 0, 1, 1024 * 1024, 2.0),
        UsageRow(today, "acme", "fal-ai/flux", 2, 0, 3, 1024 * 768 + 512 * 512 + 64 * 48, 1.75),
    ]
    assert rows[1].megapixels == (1024 * 768 + 512 * 512 + 64 * 48) / 1e6
    totals = api.usage_totals()  # every day summed: here the one day's rows, day ""
    assert totals == [UsageRow("", row.tenant, row.app_id, *astuple(row)[3:]) for row in rows]
    assert all(type(value) is int for value in astuple(totals[0])[3:7])
    assert api.usage("2000-01-01", "2000-12-31") == []  # another range: nothing


def test_failures_cancels_and_deadlines_count_as_failed_requests_without_images(
    api: JobQueue, worker: JobQueue
) -> None:
    failing = api.submit(make_job(tenant="t")).id
    assert worker.claim("w1", timeout=0) is not None
    assert worker.fail(failing, "w1", JobError(message="boom", error_type="internal_server_error"))
    cancelled = api.submit(make_job(tenant="t")).id
    assert api.cancel(cancelled) is CancelOutcome.CANCELLED
    api.submit(make_job(tenant="t", start_deadline=time.time() - 1))
    assert api.recover_expired()

    (row,) = api.usage()
    assert (row.tenant, row.requests, row.failed, row.images, row.pixels, row.gpu_seconds) == (
        "t",
        3,
        3,
        0,
        0,
        0,
    )


def test_usage_outlives_the_purge_of_its_jobs(api: JobQueue, worker: JobQueue) -> None:
    run(api, worker, "t", "fal-ai/flux", result_of((64, 64), inference=0.5))
    assert len(api.purge(time.time() + 1)) == 1
    (row,) = api.usage()
    assert (row.requests, row.images, row.pixels) == (1, 1, 64 * 64)
