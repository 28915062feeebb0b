"""The worker's GPU memory figures (`fluxserver_gpu_memory_*`), on the path only a CUDA device
reaches: a worker told it runs on "cuda" serves the real tiny runtime on the CPU, with the
three CUDA calls it makes stood in. Before this test, that path called a function that no
longer existed and crashed every GPU worker right after it reported ready."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY

from models.loading import load_runtime
from models.runtime import FluxRuntime
from server.config import Settings
from server.jobs import Status
from server.queue.base import JobQueue
from server.queue.factory import open_queue
from tests.server.worker.support import ThreadWorker, completed, job, make_data_dir
from tests.support import wait_until

GIB = 1024**3


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> FluxRuntime:
    data_dir = make_data_dir(tmp_path_factory.mktemp("gpu-memory-runtime"), tiny_model_dir)
    return load_runtime("tiny", data_dir=data_dir, device="cpu", memory_plan="resident")


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    data_dir = make_data_dir(tmp_path / "data", tiny_model_dir)
    return Settings(model="tiny", data_dir=data_dir, device="cuda", lease_seconds=1.5)


@pytest.fixture
def api(settings: Settings) -> Iterator[JobQueue]:
    queue = open_queue(settings, role="api")
    yield queue
    queue.close()


def gauge(name: str, worker: str) -> float | None:
    return REGISTRY.get_sample_value(f"fluxserver_gpu_memory_{name}_bytes", {"worker": worker})


def test_a_cuda_worker_reports_its_gpu_memory_when_ready_and_after_each_job(
    settings: Settings, api: JobQueue, runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[object] = []
    allocated = [3 * GIB]

    def memory_allocated(device: object = None) -> int:
        asked.append(device)
        return allocated[0]

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", memory_allocated)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * GIB)
    )
    worker = ThreadWorker(settings, "gpu-mem", runtime=runtime).start(api)
    try:
        assert worker.worker.device == "cuda"
        wait_until(lambda: gauge("used", "gpu-mem") == 3 * GIB, 10, "the ready figure")
        assert gauge("total", "gpu-mem") == 80 * GIB
        assert asked == [0]  # the device is named, never left to the calling thread

        allocated[0] = 5 * GIB
        request_id = api.submit(job()).id
        record = wait_until(completed(api, request_id), 120, "the job")
        assert record.status is Status.COMPLETED
        wait_until(lambda: gauge("used", "gpu-mem") == 5 * GIB, 10, "the figure after the job")
        assert worker.state(api) == "ready" and worker.exits == []
    finally:
        assert worker.stop() == 0


def test_a_figure_that_cannot_be_read_never_ends_the_worker(
    settings: Settings,
    api: JobQueue,
    runtime: FluxRuntime,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(device: object = None) -> int:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", broken)
    worker = ThreadWorker(settings, "gpu-mem-broken", runtime=runtime).start(api)
    try:
        request_id = api.submit(job()).id
        assert wait_until(completed(api, request_id), 120, "the job").status is Status.COMPLETED
        assert worker.state(api) == "ready" and worker.exits == []
        assert "could not read the GPU's memory for /metrics" in caplog.text
        assert gauge("used", "gpu-mem-broken") is None
    finally:
        assert worker.stop() == 0
