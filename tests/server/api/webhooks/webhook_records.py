"""Completed records with a webhook, for the payload tests of each protocol."""

from __future__ import annotations

import time

from server.jobs import Job, JobError, JobRecord, JobResult, OutputImage, Status, Webhook


def make_record(kind: str, *, error: JobError | None = None, flagged: bool = False) -> JobRecord:
    job = Job(
        prompt="a red fox",
        width=256,
        height=256,
        seed=7,
        protocol="fal" if kind == "fal" else "bfl",
        webhook=Webhook(url="http://127.0.0.1:1/hook", kind=kind, secret="s" if kind == "bfl" else None),
        base_url="https://flux.local:8443",
        safety_tolerance=None if kind == "fal" else 2,
    )
    result = None
    if error is None:
        image = OutputImage(
            width=256, height=256, content_type="image/jpeg", file_name="abc.jpeg", file_size=10
        )
        result = JobResult(
            images=[image],
            seed=7,
            prompt="a red fox",
            has_nsfw_concepts=[flagged],
            nsfw_checked=True,
            timings={"inference": 0.5},
            preset="none",
        )
    now = time.time()
    return JobRecord(
        id="req-1",
        job=job,
        status=Status.COMPLETED,
        started_at=now - 1,
        completed_at=now,
        result=result,
        error=error,
    )
