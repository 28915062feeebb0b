"""The progress relay (server/worker/progress.py): the denoising thread never waits on the
queue. Its steps and the cancel flag go through memory; the relay writes every step line
(throttled: a pass at most every RELAY_INTERVAL_SECONDS, and one at the last step) and reads
the cancel flag. First the relay alone on a real SQLite queue, then a real worker on the tiny
runtime, whose queue calls are counted by the thread that makes them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from models.runtime import FluxRuntime
from server.config import Settings
from server.jobs import JobRecord
from server.queue.base import CancelOutcome, JobQueue
from server.queue.factory import open_queue
from server.worker import Worker
from server.worker.held import HeldJob, HeldJobs, Stage
from server.worker.progress import RELAY_INTERVAL_SECONDS, ProgressRelay
from server.worker.retry import QueueOutage
from tests.server.worker.support import (
    CallsWhileGenerating,
    InjectedOutage,
    ThreadWorker,
    completed,
    job,
    make_data_dir,
)
from tests.support import wait_until

# --------------------------------------------------------------------------- the relay alone


@dataclass
class Relayed:
    queue: JobQueue
    relay: ProgressRelay
    held: HeldJobs
    outage: QueueOutage
    record: JobRecord
    job: HeldJob

    def steps(self) -> list[str]:
        record = self.queue.get(self.record.id)
        assert record is not None
        return [entry.message for entry in record.logs if entry.message.startswith("step ")]

    def progress(self) -> float:
        record = self.queue.get(self.record.id)
        assert record is not None
        return record.progress


@pytest.fixture
def relayed(tmp_path: Path) -> Iterator[Relayed]:
    """A claimed job held by a relay that is not running: the test runs its passes."""
    queue = open_queue(Settings(data_dir=tmp_path), role="worker")
    queue.submit(job(num_inference_steps=4))
    record = queue.claim("w", timeout=0)
    assert record is not None
    held, outage = HeldJobs(), QueueOutage()
    held_job = held.hold(record)
    held_job.enter(Stage.DENOISING)
    yield Relayed(queue, ProgressRelay(queue, held, outage), held, outage, record, held_job)
    queue.close()


def test_every_step_gets_its_line_in_order_and_the_last_of_a_pass_the_progress(relayed: Relayed) -> None:
    relayed.job.stepped(1, 4)
    relayed.job.stepped(2, 4)
    relayed.relay.relay_all()
    assert relayed.steps() == ["step 1/4", "step 2/4"] and relayed.progress() == 0.5
    relayed.relay.relay_all()  # nothing new: nothing written again
    assert relayed.steps() == ["step 1/4", "step 2/4"]
    relayed.job.stepped(3, 4)
    relayed.job.stepped(4, 4)
    relayed.relay.flush(relayed.job, final=True)
    assert relayed.steps() == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"] and relayed.progress() == 1.0


def test_a_job_run_again_one_image_at_a_time_starts_its_lines_again(relayed: Relayed) -> None:
    relayed.job.stepped(1, 4)
    relayed.relay.relay_all()
    relayed.job.stepped(2, 12)  # the out-of-memory fallback: 3 images one at a time, 4 steps each
    relayed.relay.relay_all()
    assert relayed.steps() == ["step 1/4", "step 1/12", "step 2/12"]
    assert relayed.progress() == pytest.approx(2 / 12)


def test_lines_the_queue_missed_come_later_in_order_unless_the_job_ended(
    relayed: Relayed, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = [True]
    db = InjectedOutage(relayed.queue, monkeypatch, lambda: down[0])
    relayed.job.stepped(1, 4)
    relayed.job.stepped(2, 4)
    relayed.relay.relay_all()
    assert relayed.outage.down and db.calls["log"] == 1  # tried once, then the outage is known
    relayed.relay.relay_all()
    assert db.calls["log"] == 1 and db.calls["is_cancel_requested"] == 0  # not even tried
    down[0] = False
    relayed.outage.succeeded()  # another thread (the heartbeat) saw the queue come back
    relayed.job.stepped(3, 4)
    relayed.relay.relay_all()
    assert relayed.steps() == ["step 1/4", "step 2/4", "step 3/4"] and relayed.progress() == 0.75

    # The final flush gives up what the queue does not take; an ended job gets nothing more.
    down[0] = True
    relayed.job.stepped(4, 4)
    relayed.relay.flush(relayed.job, final=True)
    down[0] = False
    relayed.outage.succeeded()
    relayed.relay.relay_all()
    relayed.held.release(relayed.job)
    relayed.job.stepped(4, 4)
    relayed.job.written = (0, 0)
    relayed.relay.flush(relayed.job)
    assert relayed.steps() == ["step 1/4", "step 2/4", "step 3/4"]


def test_the_cancel_flag_is_read_only_for_jobs_still_on_the_device(
    relayed: Relayed, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = InjectedOutage(relayed.queue, monkeypatch, lambda: False)
    relayed.relay.relay_all()
    assert db.calls["is_cancel_requested"] == 1 and not relayed.job.cancel_requested
    assert relayed.queue.cancel(relayed.record.id) is CancelOutcome.REQUESTED
    relayed.relay.relay_all()
    assert relayed.job.cancel_requested and db.calls["is_cancel_requested"] == 2
    relayed.relay.relay_all()  # known: not read again
    assert db.calls["is_cancel_requested"] == 2
    relayed.job.cancel_requested = False
    relayed.job.enter(Stage.HANDED_OVER)  # the images exist: a cancel cannot stop it any more
    relayed.relay.relay_all()
    assert db.calls["is_cancel_requested"] == 2


def test_the_last_step_wakes_the_relay_at_once(relayed: Relayed) -> None:
    relay = ProgressRelay(relayed.queue, relayed.held, relayed.outage, interval=60.0)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        relayed.job.stepped(4, 4)
        relay.wake()
        wait_until(lambda: relayed.progress() == 1.0, 10, "the last step's progress")
    finally:
        relay.stop.set()
        relay.wake()
        thread.join(10)
    assert not thread.is_alive()


# --------------------------------------------------------------------------- in a real worker


@dataclass
class Served:
    api: JobQueue
    worker: Worker
    runtime: FluxRuntime


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    data_dir = make_data_dir(tmp_path_factory.mktemp("progress") / "data", tiny_model_dir)
    settings = Settings(model="tiny", data_dir=data_dir, device="cpu", lease_seconds=30.0)
    api = open_queue(settings, role="api")
    running = ThreadWorker(settings, "relayed").start(api)
    assert running.worker.runtime is not None
    yield Served(api, running.worker, running.worker.runtime)
    assert running.stop() == 0 and running.exits == []
    api.close()


def slow_steps(runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Each denoising step takes at least `seconds` (a device slower than the tiny model)."""
    original = runtime.generate

    def generate(request, on_step=None, should_cancel=None):  # type: ignore[no-untyped-def]
        def step(i: int, total: int) -> None:
            time.sleep(seconds)
            if on_step is not None:
                on_step(i, total)

        return original(request, on_step=step, should_cancel=should_cancel)

    monkeypatch.setattr(runtime, "generate", generate)


def test_no_queue_call_on_the_denoising_thread_and_every_step_line_throttled(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_steps(served.runtime, monkeypatch, 0.05)  # 20 steps: about a second
    queue_calls = CallsWhileGenerating(served.runtime, served.worker.queue, monkeypatch)
    rid = served.api.submit(job(num_inference_steps=20)).id
    record = wait_until(completed(served.api, rid), what="the job")
    assert record.succeeded and record.progress == 1.0
    assert queue_calls.generations == 1 and queue_calls.calls == []
    messages = [entry.message for entry in record.logs]
    steps = [m for m in messages if m.startswith("step ")]
    assert steps == [f"step {i}/20" for i in range(1, 21)]
    assert messages[-1].startswith("Generated 1 image(s)")
    # Written by the relay (or the finisher's last flush), never by the main loop's thread.
    logs = [
        (thread, kwargs)
        for thread, method, args, kwargs in queue_calls.by_thread
        if method == "log" and args[0] == rid
    ]
    writers = {thread for thread, _ in logs}
    assert writers <= {"progress", "finisher"}, writers
    # Throttled: a write of the progress once per pass, not once per step.
    progress_writes = [kwargs["progress"] for _, kwargs in logs if kwargs.get("progress") is not None]
    # One pass per interval while it denoised, plus those the first and last steps wake.
    passes = record.result.timings["denoise"] / RELAY_INTERVAL_SECONDS + 3
    assert 1 <= len(progress_writes) <= passes and len(progress_writes) < 20, progress_writes
    assert progress_writes[-1] == 1.0


def test_a_cancel_stops_a_running_job_within_about_a_second(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_steps(served.runtime, monkeypatch, 0.1)  # 50 steps (the most a request may ask): 5 s
    queue_calls = CallsWhileGenerating(served.runtime, served.worker.queue, monkeypatch)
    rid = served.api.submit(job(num_inference_steps=50)).id
    wait_until(lambda: (r := served.api.get(rid)) is not None and r.progress > 0, what="the first steps")
    cancelled_at = time.monotonic()
    assert served.api.cancel(rid) is CancelOutcome.REQUESTED
    record = wait_until(completed(served.api, rid), what="the cancelled job")
    stopped_after = time.monotonic() - cancelled_at
    assert record.error is not None and record.error.error_type == "request_cancelled"
    steps = [e.message for e in record.logs if e.message.startswith("step ")]
    assert 1 <= len(steps) < 50
    # The relay reads the flag every RELAY_INTERVAL_SECONDS; the job stops at its next step.
    assert stopped_after < 3.0, stopped_after
    assert queue_calls.calls == []


def test_the_idle_gap_between_queued_jobs_is_a_metric(served: Served) -> None:
    from prometheus_client import REGISTRY

    def observed() -> float:
        return REGISTRY.get_sample_value("fluxserver_device_idle_seconds_count") or 0.0

    before = observed()
    alone = wait_until(completed(served.api, served.api.submit(job(seed=1)).id), what="a job alone")
    assert observed() == before  # the device waited for a request, not for the worker
    first = served.api.submit(job(seed=2, num_inference_steps=20)).id
    second = served.api.submit(job(seed=3)).id
    done = [wait_until(completed(served.api, rid), what="the queued jobs") for rid in (first, second)]
    assert observed() == before + 1  # the second was waiting when the first left the device
    gap = done[1].result.timings["device_idle_before"]
    assert 0 <= gap < done[0].result.timings["inference"] and alone.succeeded
