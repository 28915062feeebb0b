"""The `backend` fixture of the queue contract suite: every backend, behind one interface
(SQLite in a temporary directory; a fresh database on the session's PostgreSQL server).

`backend.open(role=..., lease_seconds=...)` returns a new handle on one shared store, as a
separate process would have; the fixture closes every handle it opened.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from server.config import Settings
from server.jobs import Job, JobResult, OutputImage
from server.queue.base import JobQueue
from server.queue.factory import open_queue
from tests.pg_server import PostgresServer

T = TypeVar("T")


def make_job(**overrides: object) -> Job:
    return Job(**{"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, **overrides})


def make_result(seed: int = 1, file_name: str = "x.jpg") -> JobResult:
    image = OutputImage(width=64, height=64, content_type="image/jpeg", file_name=file_name, file_size=10)
    return JobResult(
        images=[image],
        seed=seed,
        prompt="a fox",
        has_nsfw_concepts=[False],
        nsfw_checked=False,
        timings={"inference": 0.1},
        preset="none",
    )


def eventually(condition: Callable[[], T], timeout: float = 10.0, what: str = "the condition") -> T:
    """Poll `condition` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class QueueBackend:
    """Opens handles on one store (one SQLite file, or one PostgreSQL database)."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self._opened: list[JobQueue] = []

    def open(self, role: str = "api", lease_seconds: float = 30.0) -> JobQueue:
        settings = self.settings.model_copy(update={"lease_seconds": lease_seconds})
        queue = open_queue(settings, role=role)
        self._opened.append(queue)
        return queue

    def input_rows(self) -> dict[str, tuple[bytes | None, bytes | None, bytes | None]]:
        """The inputs table as stored: request id -> (image, mask, reference_image)."""
        columns = "request_id, image, mask, reference_image"
        if self.settings.queue_url is None:
            with contextlib.closing(sqlite3.connect(self.settings.db_path)) as conn:
                rows = conn.execute(f"SELECT {columns} FROM job_inputs").fetchall()
        else:
            with psycopg.connect(self.settings.queue_url) as conn:
                rows = conn.execute(f"SELECT {columns} FROM flux_job_inputs").fetchall()
        return {rid: (image, mask, reference) for rid, image, mask, reference in rows}

    def close(self) -> None:
        for queue in reversed(self._opened):
            queue.close()
        self._opened.clear()


def _sqlite_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def _postgres_settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return Settings(data_dir=tmp_path / "data", queue_url=server.fresh_database_url())


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Settings]] = {
    "sqlite": _sqlite_settings,
    "postgres": _postgres_settings,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueBackend]:
    settings = BACKENDS[request.param](tmp_path, request)
    queues = QueueBackend(request.param, settings)
    yield queues
    queues.close()


@pytest.fixture
def api(backend: QueueBackend) -> JobQueue:
    return backend.open("api")


@pytest.fixture
def worker(backend: QueueBackend) -> JobQueue:
    return backend.open("worker")
