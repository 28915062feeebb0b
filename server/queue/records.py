"""What every backend shares about rows: priority ranks, log timestamps, decoding a stored
job without re-parsing its JSON on every status poll, and the files a stored result names.

A job's input images (`Job.image`, `Job.mask`, `Job.reference_image`) are stored apart from
its JSON, in an inputs table of their own, written in the transaction that stores the job. Only
`claim` reads them back (the worker needs them); status polls, `get` and every cache see the
job without them, so a queue full of image-to-image jobs polls as fast as one of text-to-image
jobs."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from datetime import datetime, timezone

from server.jobs import Job

PRIORITY_RANK = {"normal": 0, "low": 1}
_JOB_CACHE_SIZE = 4096


def utc_timestamp(now: float | None = None) -> str:
    """fal's log timestamp: naive UTC ISO with microseconds, e.g. 2024-12-20T15:37:17.120314."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")


# The Job's input image fields, in the order of the inputs table's columns.
INPUT_FIELDS = ("image", "mask", "reference_image")
InputRow = tuple[bytes | None, bytes | None, bytes | None]


def without_inputs(job: Job) -> Job:
    """The job as stored in its JSON column and as the API sees it: no input image bytes."""
    if all(getattr(job, name) is None for name in INPUT_FIELDS):
        return job
    return job.model_copy(update=dict.fromkeys(INPUT_FIELDS))


def input_row(job: Job) -> InputRow | None:
    """The job's input images as an inputs-table row (after the request id), None for none."""
    row = (job.image, job.mask, job.reference_image)
    return row if any(value is not None for value in row) else None


def with_inputs(
    job: Job, image: bytes | None, mask: bytes | None, reference_image: bytes | None = None
) -> Job:
    """The claimed job with its inputs from the inputs table. A row stored before that table
    existed kept its image in the jobs table and its mask in the JSON: those are kept when
    the inputs table has nothing."""
    values = zip(INPUT_FIELDS, (image, mask, reference_image), strict=True)
    update = {name: value for name, value in values if value is not None}
    return job.model_copy(update=update) if update else job


def file_names_in_results(result_jsons: Iterable[str]) -> set[str]:
    """The stored files that results (their `result_json` columns) reference: each image's
    `file_name` (an inline image has none). Plain JSON, not the models: one sweep may read
    many thousands of results."""
    names: set[str] = set()
    for result_json in result_jsons:
        for image in json.loads(result_json).get("images") or []:
            if image.get("file_name"):
                names.add(image["file_name"])
    return names


class JobCache:
    """Parsed jobs (without their inputs) by request id: a job's JSON never changes after submit."""

    def __init__(self, size: int = _JOB_CACHE_SIZE) -> None:
        self.size = size
        self._jobs: dict[str, Job] = {}

    def job(self, request_id: str, job_json: str) -> Job:
        job = self._jobs.get(request_id)
        if job is None:
            # A row from before the inputs table may still carry its mask in the JSON.
            job = without_inputs(Job.model_validate_json(job_json))
            self.put(request_id, job)
        return job

    def put(self, request_id: str, job: Job) -> None:
        if len(self._jobs) >= self.size:
            self._jobs.pop(next(iter(self._jobs)), None)
        self._jobs[request_id] = job

    def forget(self, request_id: str) -> None:
        self._jobs.pop(request_id, None)
