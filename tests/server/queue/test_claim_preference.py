"""`claim(prefer=...)`: a worker that already holds a job's LoRAs takes it first, within a
window, never across priorities, and never once the head has waited `max_wait` (no starvation).
Runs on every queue backend."""

from __future__ import annotations

from server.jobs import LoraRef
from server.queue.base import ClaimPreference, JobQueue
from tests.server.queue.conftest import make_job


def holds(path: str) -> ClaimPreference:
    return ClaimPreference(wants=lambda job: any(lora.path == path for lora in job.loras), window=3)


def submit(api: JobQueue, *loras: str, **fields: object) -> str:
    return api.submit(make_job(loras=tuple(LoraRef(path=p) for p in loras), **fields)).id


def test_a_wanted_job_goes_first(api: JobQueue, worker: JobQueue) -> None:
    plain = submit(api)
    ink = submit(api, "ink")
    other = submit(api, "oil")
    first = worker.claim("w-ink", timeout=1, prefer=holds("ink"))
    assert first is not None and first.id == ink
    assert [worker.claim("w", timeout=1).id for _ in range(2)] == [plain, other]  # type: ignore[union-attr]


def test_no_preference_or_no_match_takes_the_head(api: JobQueue, worker: JobQueue) -> None:
    plain = submit(api)
    submit(api, "oil")
    assert worker.claim("w", timeout=1, prefer=holds("ink")).id == plain  # type: ignore[union-attr]


def test_only_within_the_window_and_the_heads_priority(api: JobQueue, worker: JobQueue) -> None:
    first = submit(api)
    for _ in range(3):
        submit(api)
    submit(api, "ink")  # fifth: outside a window of 3
    assert worker.claim("w", timeout=1, prefer=holds("ink")).id == first  # type: ignore[union-attr]
    worker_ids = [worker.claim("w", timeout=1).id for _ in range(4)]  # type: ignore[union-attr]
    assert len(worker_ids) == 4

    normal = submit(api)
    submit(api, "ink", priority="low")
    assert worker.claim("w", timeout=1, prefer=holds("ink")).id == normal  # type: ignore[union-attr]


def test_a_head_that_waited_long_enough_is_not_skipped(api: JobQueue, worker: JobQueue) -> None:
    head = submit(api)
    submit(api, "ink")
    # max_wait 0: any head has waited long enough, so it goes first whatever the preference.
    impatient = ClaimPreference(wants=holds("ink").wants, max_wait=0.0)
    assert worker.claim("w", timeout=1, prefer=impatient).id == head  # type: ignore[union-attr]


def test_a_worker_takes_only_the_jobs_it_can(api: JobQueue, worker: JobQueue) -> None:
    """A worker that serves some variants only: other workers' jobs are left in the queue,
    "the head" is its first takeable job, and with none in the window it claims nothing."""
    dev = api.submit(make_job()).id
    fill = api.submit(make_job(variant="fill")).id
    only_fill = ClaimPreference(wants=lambda job: False, can_take=lambda job: job.variant == "fill")
    assert worker.claim("w-fill", timeout=1, prefer=only_fill).id == fill  # type: ignore[union-attr]
    assert worker.claim("w-fill", timeout=0.2, prefer=only_fill) is None  # the dev job stays
    assert worker.claim("w", timeout=1).id == dev  # type: ignore[union-attr]
