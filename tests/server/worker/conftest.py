"""Fixtures of the worker tests that inject faults into the real tiny runtime: the runtime,
loaded once per module (on the CPU; a test stands in the CUDA calls it needs), and the API's
handle on the queue of each test's `settings` (a fixture every module defines itself)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.loading import load_runtime
from models.runtime import FluxRuntime
from server.config import Settings
from server.queue.base import JobQueue
from server.queue.factory import open_queue
from tests.server.worker.support import make_data_dir


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> FluxRuntime:
    data_dir = make_data_dir(tmp_path_factory.mktemp("worker-runtime"), tiny_model_dir)
    return load_runtime("tiny", data_dir=data_dir, device="cpu", memory_plan="resident")


@pytest.fixture
def api(settings: Settings) -> Iterator[JobQueue]:
    queue = open_queue(settings, role="api")
    yield queue
    queue.close()
