"""GPU faults injected into the real tiny runtime on the CPU (the one place a stand-in for the
GPU is acceptable): out-of-memory, a sticky CUDA error, a run of failures, a hung device, and
a helper thread that dies. Each test runs its own worker (in a thread) on a runtime loaded
once for the module."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.runtime import FluxRuntime
from server.config import Settings
from server.exit_codes import (
    EXIT_DEVICE_LOST,
    EXIT_FAILING,
    EXIT_HELPER_DIED,
    EXIT_HUNG,
    EXIT_LOAD_FAILED,
)
from server.jobs import JobRecord, Status
from server.queue.base import JobQueue
from server.storage import LocalStorage
from server.worker import run_worker
from server.worker.faults import DEVICE_LOST_REQUEUED, GpuFault, gpu_fault
from tests.server.worker.support import ThreadWorker, completed, job, make_data_dir, pause_at_step
from tests.support import wait_until

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    data_dir = make_data_dir(tmp_path / "data", tiny_model_dir)
    return Settings(model="tiny", data_dir=data_dir, device="cpu", lease_seconds=1.5)


def start(
    settings: Settings,
    api: JobQueue,
    runtime: FluxRuntime,
    worker_id: str = "gpu",
    *,
    wait_ready: bool = True,
) -> ThreadWorker:
    return ThreadWorker(settings, worker_id, runtime=runtime).start(api, wait_ready=wait_ready)


def raising(
    runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch, when: Callable[[object], Exception | None]
) -> None:
    """`runtime.generate` raises `when(request)` when that is not None."""
    original = runtime.generate

    def generate(request, on_step=None, should_cancel=None):  # type: ignore[no-untyped-def]
        error = when(request)
        if error is not None:
            raise error
        return original(request, on_step=on_step, should_cancel=should_cancel)

    monkeypatch.setattr(runtime, "generate", generate)


def pixels(settings: Settings, record: JobRecord) -> list[bytes]:
    storage = LocalStorage(settings.files_dir)
    out = []
    for image in record.result.images:
        with Image.open(storage.path(image.file_name)) as opened:
            out.append(opened.convert("RGB").tobytes())
    return out


def test_errors_are_classified() -> None:
    assert gpu_fault(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) is (
        GpuFault.OUT_OF_MEMORY
    )
    assert gpu_fault(RuntimeError(ILLEGAL_ACCESS)) is GpuFault.DEVICE_LOST
    assert gpu_fault(RuntimeError("CUDA error: device-side assert triggered")) is GpuFault.DEVICE_LOST
    assert gpu_fault(RuntimeError("CUDA error: CUDA-capable device(s) is/are busy or unavailable")) is (
        GpuFault.DEVICE_LOST
    )
    wrapped = ValueError("inside diffusers")
    wrapped.__cause__ = RuntimeError("CUDA error: unspecified launch failure")
    assert gpu_fault(wrapped) is GpuFault.DEVICE_LOST
    assert gpu_fault(RuntimeError("shapes cannot be multiplied")) is None
    assert gpu_fault(ValueError("illegal memory access")) is None  # not a CUDA runtime error


def test_out_of_memory_on_a_batch_retries_one_image_at_a_time(
    settings: Settings, api: JobQueue, runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start(settings, api, runtime)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    raising(runtime, monkeypatch, lambda request: oom if request.num_images > 1 else None)
    batch = wait_until(completed(api, api.submit(job(num_images=3, seed=7, output_format="png")).id))
    assert batch.succeeded and len(batch.result.images) == 3 and batch.result.seed == 7
    messages = [e.message for e in batch.logs]
    assert any("generated one at a time with seeds 7, 8, 9" in m for m in messages)
    steps = [m for m in messages if m.startswith("step ")]
    assert steps[0] == "step 1/9" and steps[-1] == "step 9/9" and batch.progress == 1.0
    # Image k of the retry is what a single image with seed 7 + k gives (image 1: the batch's).
    singles = [
        wait_until(completed(api, api.submit(job(num_images=1, seed=seed, output_format="png")).id))
        for seed in (7, 8)
    ]
    assert pixels(settings, batch)[:2] == [pixels(settings, single)[0] for single in singles]
    assert running.stop() == 0


def test_out_of_memory_on_one_image_fails_the_job_naming_the_size(
    settings: Settings, api: JobQueue, runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = start(settings, api, runtime)
    raising(runtime, monkeypatch, lambda request: torch.cuda.OutOfMemoryError("CUDA out of memory."))
    single = wait_until(completed(api, api.submit(job(width=96, height=64)).id))
    assert (
        single.error.message == "the GPU ran out of memory generating an image of 96x64; try a smaller size"
    )
    batch = wait_until(completed(api, api.submit(job(num_images=2)).id))
    assert batch.error.message == (
        "the GPU ran out of memory generating 2 images of 64x64, also one at a time; try a smaller size"
    )
    assert batch.error.status_code == 500 and batch.error.error_type == "internal_server_error"
    monkeypatch.undo()
    assert wait_until(completed(api, api.submit(job()).id)).succeeded  # the worker serves on
    assert running.stop() == 0


def test_a_sticky_cuda_error_requeues_the_job_uncounted_and_ends_the_worker(
    settings: Settings, api: JobQueue, runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    raising(runtime, monkeypatch, lambda request: RuntimeError(ILLEGAL_ACCESS))
    first = start(settings, api, runtime, "first")
    rid = api.submit(job()).id
    assert first.join() == EXIT_DEVICE_LOST
    record = api.get(rid)
    assert record.status is Status.IN_QUEUE and record.attempts == 0
    assert any(e.message == DEVICE_LOST_REQUEUED for e in record.logs)
    # The CUDA error's text is for the operators (worker log, /health), never in the job's log.
    assert not any(ILLEGAL_ACCESS in e.message for e in record.logs)
    info = {w.worker_id: w for w in api.workers()}["first"]
    assert info.state == "failed" and ILLEGAL_ACCESS in info.detail

    # The same job takes down a second worker: a poison job, failed rather than requeued again.
    second = start(settings, api, runtime, "second", wait_ready=False)  # it dies at once
    assert second.join() == EXIT_DEVICE_LOST
    record = api.get(rid)
    assert record.status is Status.COMPLETED and record.error.error_type == "internal_server_error"
    assert record.error.message.startswith(f"the GPU failed twice running request {rid}")
    assert ILLEGAL_ACCESS not in record.error.message

    monkeypatch.undo()
    third = start(settings, api, runtime, "third")
    assert wait_until(completed(api, api.submit(job()).id)).succeeded
    assert third.stop() == 0


def test_failures_in_a_row_stop_the_worker_from_draining_the_queue(
    settings: Settings, api: JobQueue, runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"max_consecutive_failures": 2})
    # Broken for every valid request; the runtime itself refuses the invalid one.
    raising(
        runtime, monkeypatch, lambda r: RuntimeError(f"broken for {r.width}") if r.width % 16 == 0 else None
    )
    broken, refused, broken_again, spared = (
        api.submit(job(width=80)).id,
        api.submit(job(width=65)).id,  # the client's fault (422): neither counts nor resets
        api.submit(job(width=96)).id,
        api.submit(job()).id,
    )
    running = start(settings, api, runtime, "failing", wait_ready=False)
    assert running.join() == EXIT_FAILING
    assert [api.get(rid).error.status_code for rid in (broken, refused, broken_again)] == [500, 422, 500]
    assert api.get(spared).status is Status.IN_QUEUE
    info = api.workers()[0]
    assert (
        info.state == "failed" and "2 jobs failed in a row" in info.detail and "broken for 96" in info.detail
    )


def test_the_watchdog_ends_a_worker_whose_job_makes_no_progress(
    settings: Settings, api: JobQueue, runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"watchdog_seconds": 1.0})
    reached, go = pause_at_step(runtime, monkeypatch)  # a device that stops answering
    running = start(settings, api, runtime, "stuck")
    rid = api.submit(job(num_inference_steps=5)).id
    assert reached.wait(60)
    wait_until(lambda: running.exits == [EXIT_HUNG], 30, "the watchdog")
    info = api.workers()[0]
    assert info.state == "failed" and f"no progress on job {rid} denoising (step 1/5)" in info.detail
    # Its lease is no longer renewed: the job goes back (here by expiry; the supervisor
    # releases a dead worker's jobs at once).
    wait_until(lambda: api.recover_expired() == [rid], 30, "the lease to run out")
    running.worker.stop()
    go.set()
    assert running.join() == 0
    assert api.get(rid).status is Status.IN_QUEUE


def test_a_helper_thread_that_dies_ends_the_process(
    settings: Settings,
    api: JobQueue,
    runtime: FluxRuntime,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reached, go = pause_at_step(runtime, monkeypatch)
    running = start(settings, api, runtime, "fragile")

    def renew(request_id: str, worker_id: str) -> bool:
        raise KeyError("a bug in the heartbeat")

    monkeypatch.setattr(running.worker.queue, "renew", renew)
    with caplog.at_level(logging.CRITICAL, logger="server.worker"):
        api.submit(job())
        assert reached.wait(60)
        wait_until(lambda: running.exits == [EXIT_HELPER_DIED], 30, "the process to be ended")
    (record,) = [r for r in caplog.records if "heartbeat thread died" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is KeyError
    go.set()
    running.stop()


def test_the_worker_runs_on_the_gpu_it_is_given_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    settings = Settings(model=str(tmp_path / "no-such-model"), data_dir=tmp_path / "data", device="cpu")
    for gpu in ("MIG-4b1d2f0e-7c3a-5a61-9a0e-2a1f3c4d5e6f", "GPU-8f0c6a3e-1b2c-4d5e-8f90-a1b2c3d4e5f6", "3"):
        codes: list[int] = []
        # In a thread: run_worker installs no signal handlers there (pytest keeps its own).
        thread = threading.Thread(
            target=lambda g=gpu, out=codes: out.append(run_worker(settings, f"w-{g[:3]}", gpu=g))
        )
        thread.start()
        thread.join(60)
        assert codes == [EXIT_LOAD_FAILED] and os.environ["CUDA_VISIBLE_DEVICES"] == gpu
