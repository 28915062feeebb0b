"""A real API process in a thread for the HTTP tests of server/: uvicorn on a free loopback
port, the real queue (from the settings), and a second queue handle (role "worker") with which the
test plays the worker (claim, log, complete, fail) without torch.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from server.api.app import create_app
from server.config import Settings
from server.jobs import JobError, JobRecord, JobResult, OutputImage, cancelled_error
from server.queue.base import JobQueue
from server.queue.factory import open_queue
from server.storage import LocalStorage
from tests.support import LOOPBACK_OUTBOUND

WORKER_ID = "test-worker"


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


@dataclass
class ApiServer:
    base_url: str
    settings: Settings
    app: FastAPI
    worker: JobQueue  # the test's own handle on the queue, as a worker process has
    client: httpx.Client

    def claim(self, expected_id: str | None = None, timeout: float = 5.0) -> JobRecord:
        record = self.worker.claim(WORKER_ID, timeout=timeout)
        assert record is not None, "no job to claim"
        if expected_id is not None:
            assert record.id == expected_id
        return record

    def complete(self, record: JobRecord, *, inline: bool = False) -> JobResult:
        """Finish a claimed job with real image files, as the worker would."""
        storage = LocalStorage(self.settings.files_dir)
        images = []
        for _ in range(record.job.num_images):
            data = png_bytes(record.job.width, record.job.height)
            if inline or record.job.inline_images:
                import base64

                uri = "data:image/png;base64," + base64.b64encode(data).decode()
                images.append(
                    OutputImage(
                        width=record.job.width,
                        height=record.job.height,
                        content_type="image/png",
                        data_uri=uri,
                        file_size=len(data),
                    )
                )
            else:
                name = storage.save(data, "png")
                images.append(
                    OutputImage(
                        width=record.job.width,
                        height=record.job.height,
                        content_type="image/png",
                        file_name=name,
                        file_size=len(data),
                    )
                )
        result = JobResult(
            images=images,
            seed=record.job.seed or 0,
            prompt=record.job.prompt,
            has_nsfw_concepts=[False] * len(images),
            nsfw_checked=False,
            timings={"inference": 0.25},
            preset=record.job.acceleration,
        )
        assert self.worker.complete(record.id, WORKER_ID, result)
        return result

    def fail(self, record: JobRecord, error: JobError) -> None:
        assert self.worker.fail(record.id, WORKER_ID, error)

    def drain(self) -> None:
        """Complete every queued job as cancelled, so that each test starts with an empty queue."""
        while (record := self.worker.claim(WORKER_ID, timeout=0)) is not None:
            self.worker.fail(record.id, WORKER_ID, cancelled_error())

    def submit(self, path: str = "/fal-ai/flux/dev", body: dict | None = None, **kwargs) -> dict:
        response = self.client.post(path, json=body if body is not None else {"prompt": "a cat"}, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()


@contextlib.contextmanager
def run_api_server(settings: Settings) -> Iterator[ApiServer]:
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            access_log=False,
            proxy_headers=False,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "API server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    worker = open_queue(settings, role="worker")
    client = httpx.Client(base_url=base_url, timeout=20)
    try:
        yield ApiServer(base_url=base_url, settings=settings, app=app, worker=worker, client=client)
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)
        worker.close()


def api_settings(data_dir: Path, **overrides) -> Settings:
    # The tests' image and webhook servers are on loopback, closed by default: opened here.
    values = {
        "api_key": [],
        "api_keys_file": None,
        "public_url": None,
        "outbound_allow": LOOPBACK_OUTBOUND,
        **overrides,
    }
    return Settings(data_dir=data_dir, **values)


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """One API server (auth off) shared by a test module; the queue is drained per test."""
    with run_api_server(api_settings(tmp_path_factory.mktemp("api"))) as server:
        yield server


@pytest.fixture
def api(api_server: ApiServer) -> Iterator[ApiServer]:
    api_server.drain()
    yield api_server
    api_server.drain()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
