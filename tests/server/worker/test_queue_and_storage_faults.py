"""Faults injected into a real worker (in a thread, on the tiny runtime, SQLite queue): lease
renewals, completions, progress writes and file storage that fail, as a database outage or a
full disk makes them fail. The job's outcome must never depend on the database's mood."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.config import Settings
from server.disk import OUTPUT_NOT_STORED_MESSAGE
from server.jobs import JobError
from server.queue.base import JobQueue, QueueUnavailable
from server.queue.factory import open_queue
from server.storage import LocalStorage
from server.worker import Worker
from tests.server.worker.support import (
    CallsWhileGenerating,
    InjectedOutage,
    ThreadWorker,
    completed,
    job,
    make_data_dir,
    pause_at_step,
)
from tests.support import wait_until

LEASE = 1.5


@dataclass
class Served:
    api: JobQueue
    settings: Settings
    worker: Worker
    running: ThreadWorker

    def files(self) -> set[str]:
        return {path.name for path in self.settings.files_dir.iterdir() if not path.name.startswith(".")}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    data_dir = make_data_dir(tmp_path_factory.mktemp("faults") / "data", tiny_model_dir)
    settings = Settings(model="tiny", data_dir=data_dir, device="cpu", lease_seconds=LEASE)
    api = open_queue(settings, role="api")
    running = ThreadWorker(settings, "faulty").start(api)
    yield Served(api, settings, running.worker, running)
    assert running.stop() == 0 and running.exits == []
    api.close()


def failing(times: int, original: Callable, exc: Exception) -> tuple[Callable, list[int]]:
    """`original`, raising `exc` on its first `times` calls; `calls[0]` counts the calls."""
    calls = [0]

    def call(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] <= times:
            raise exc
        return original(*args, **kwargs)

    return call, calls


def outage() -> QueueUnavailable:
    return QueueUnavailable("the queue database at db:5432/flux is unavailable: Connection refused")


def test_renewals_failing_for_longer_than_a_lease_neither_rerun_nor_fail_the_job(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, runtime = served.worker.queue, served.worker.runtime
    reached, go = pause_at_step(runtime, monkeypatch)
    renew, calls = failing(4, queue.renew, outage())  # about 2 s: longer than the lease
    rid = served.api.submit(job(seed=5)).id
    assert reached.wait(60)
    monkeypatch.setattr(queue, "renew", renew)
    wait_until(lambda: calls[0] >= 6, 30, "renewals to work again")
    # The heartbeat survived its failures and renewed the lease: nothing for recovery to take.
    assert served.api.recover_expired() == []
    go.set()
    record = wait_until(completed(served.api, rid), what="the job")
    assert record.succeeded and record.attempts == 1 and record.worker == "faulty"
    assert "Worker lost; retrying" not in [entry.message for entry in record.logs]


def test_a_completion_that_fails_is_retried_until_the_queue_answers(
    served: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Down from the first completion attempt until three of them failed.
    db = InjectedOutage(served.worker.queue, monkeypatch, lambda: 1 <= db.calls["complete"] <= 3)
    with caplog.at_level(logging.WARNING, logger="server.worker"):
        rid = served.api.submit(job(output_format="png")).id
        record = wait_until(completed(served.api, rid), what="the job")
    assert record.succeeded and record.attempts == 1 and db.calls["complete"] == 4
    (image,) = record.result.images
    assert LocalStorage(served.settings.files_dir).path(image.file_name) is not None  # kept
    messages = [r.getMessage() for r in caplog.records]
    assert sum("the queue is unavailable" in m for m in messages) == 1  # once per outage
    assert sum("reachable again" in m for m in messages) == 1


def test_a_lost_completion_acknowledgement_keeps_the_output(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = served.worker.queue
    real_complete = queue.complete
    calls = [0]

    def commit_then_lose_the_answer(request_id, worker_id, result):  # type: ignore[no-untyped-def]
        calls[0] += 1
        done = real_complete(request_id, worker_id, result)
        if calls[0] == 1:
            raise outage()  # the COMMIT landed; its acknowledgement did not
        return done

    monkeypatch.setattr(queue, "complete", commit_then_lose_the_answer)
    rid = served.api.submit(job()).id
    record = wait_until(completed(served.api, rid), what="the job")
    wait_until(lambda: not served.worker.held.snapshot(), what="the worker to let the job go")
    assert calls[0] == 2 and record.succeeded  # retried: the second answer is False on SQLite
    (image,) = record.result.images
    assert LocalStorage(served.settings.files_dir).path(image.file_name) is not None


def test_a_refused_completion_deletes_the_files_it_wrote(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue, api = served.worker.queue, served.api
    real_complete = queue.complete
    refused = JobError(message="taken away", error_type="runner_disconnected", status_code=503)

    def taken_away_first(request_id, worker_id, result):  # type: ignore[no-untyped-def]
        api.fail(request_id, None, refused)  # e.g. its lease ran out and the retry failed it
        return real_complete(request_id, worker_id, result)

    monkeypatch.setattr(queue, "complete", taken_away_first)
    storage = served.worker.storage  # the finisher's
    real_delete = storage.delete

    def slow_delete(file_name: str) -> None:  # a slow store: the files must still be gone first
        time.sleep(0.2)
        real_delete(file_name)

    monkeypatch.setattr(storage, "delete", slow_delete)
    before = served.files()
    rid = api.submit(job(num_images=2)).id
    record = wait_until(completed(api, rid), what="the job")
    assert record.error == refused
    wait_until(lambda: rid not in {j.id for j in served.worker.held.snapshot()}, what="the job to be let go")
    assert served.files() == before


def test_an_outage_during_generation_never_fails_the_job(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database goes away at the first progress write and comes back when the images are
    generated: progress writes and cancel-flag reads are skipped, the job completes, on its
    first attempt, without the database's error text anywhere. The denoising thread never
    waited on the queue: it made no queue call at all while it generated."""
    runtime = served.worker.runtime
    generating = CallsWhileGenerating(runtime, served.worker.queue, monkeypatch)
    db = InjectedOutage(
        served.worker.queue, monkeypatch, lambda: db.calls["log"] >= 1 and generating.generations == 0
    )
    rid = served.api.submit(job(num_inference_steps=10)).id
    record = wait_until(completed(served.api, rid), what="the job")
    assert record.succeeded and record.error is None and record.attempts == 1
    messages = [e.message for e in record.logs]
    assert messages[-1].startswith("Generated 1 image(s)")  # the finisher tries anyway
    # The first step line met the outage; lines written once it ended (if the relay saw it
    # end before the job's last line) continue from there, in order, none after "Generated".
    steps = [m for m in messages if m.startswith("step ")]
    assert steps == [f"step {i}/10" for i in range(1, len(steps) + 1)]
    assert db.calls["log"] >= 2 and generating.calls == []


@pytest.mark.parametrize(
    ("error", "message", "status"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), OUTPUT_NOT_STORED_MESSAGE, 507),
        (OSError(errno.EIO, "Input/output error"), "the output could not be stored: Input/output error", 500),
    ],
)
def test_an_output_that_cannot_be_stored_fails_its_job_and_the_worker_keeps_serving(
    served: Served, monkeypatch: pytest.MonkeyPatch, error: OSError, message: str, status: int
) -> None:
    storage = served.worker.storage
    real_save = storage.save
    calls = [0]

    def second_save_fails(data: bytes, extension: str) -> str:
        calls[0] += 1
        if calls[0] == 2:
            raise error
        return real_save(data, extension)

    monkeypatch.setattr(storage, "save", second_save_fails)
    before = served.files()
    rid = served.api.submit(job(num_images=2)).id
    record = wait_until(completed(served.api, rid), what="the job")
    assert record.error is not None and record.error.message == message
    assert record.error.status_code == status and record.error.error_type == "internal_server_error"
    assert served.files() == before  # the image stored before the failure is gone too
    monkeypatch.undo()
    assert wait_until(completed(served.api, served.api.submit(job()).id), what="the next job").succeeded
    assert served.running.thread.is_alive() and served.running.exits == []
