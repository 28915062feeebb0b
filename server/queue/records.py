"""What every backend shares about rows: priority ranks, log timestamps, decoding a stored
job without re-parsing its JSON on every status poll, and the files a stored result names."""

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


def without_image(job: Job) -> Job:
    """The job as stored in its JSON column: the input image lives in a column of its own."""
    return job.model_copy(update={"image": None}) if job.image is not None else job


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
    """Parsed image-less jobs by request id: a job's JSON never changes after submit."""

    def __init__(self, size: int = _JOB_CACHE_SIZE) -> None:
        self.size = size
        self._jobs: dict[str, Job] = {}

    def job(self, request_id: str, job_json: str, image: bytes | None) -> Job:
        job = self._jobs.get(request_id)
        if job is None:
            job = Job.model_validate_json(job_json)
            self.put(request_id, job)
        return job if image is None else job.model_copy(update={"image": image})

    def put(self, request_id: str, job: Job) -> None:
        if len(self._jobs) >= self.size:
            self._jobs.pop(next(iter(self._jobs)), None)
        self._jobs[request_id] = job

    def forget(self, request_id: str) -> None:
        self._jobs.pop(request_id, None)
