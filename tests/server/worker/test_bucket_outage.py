"""A real worker (in a thread, tiny runtime, SQLite queue) storing into a real bucket (its own
SeaweedFS, stopped and started again by the tests): a job's images go to the bucket with
presigned URLs valid for the retention time, nothing to the files directory; an outage shorter
than `--storage-retry-seconds` delays the job, a longer one fails it with the reason, and the
worker goes on serving once the bucket is back. Nothing accepted is lost either way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from models.lora.tiny_loras import write_lora
from server.config import Settings
from server.jobs import LoraRef
from server.queue.base import JobQueue
from server.queue.factory import open_queue
from server.storage import file_url
from tests.s3_server import S3Server, running_s3_server
from tests.server.worker.support import ThreadWorker, completed, job, make_data_dir
from tests.support import wait_until

RETRY_SECONDS = 8.0


@dataclass
class Served:
    api: JobQueue
    settings: Settings
    s3: S3Server
    bucket: str
    running: ThreadWorker


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("bucket-outage")
    with running_s3_server(root / "weed") as s3, pytest.MonkeyPatch.context() as patch:
        for name, value in s3.env().items():
            patch.setenv(name, value)
        bucket = s3.fresh_bucket()
        settings = Settings(
            model="tiny",
            data_dir=make_data_dir(root / "data", tiny_model_dir),
            device="cpu",
            storage_url=f"s3://{bucket}/images",
            storage_retry_seconds=RETRY_SECONDS,
            retention_seconds=600,
        )
        api = open_queue(settings, role="api")
        running = ThreadWorker(settings, "w-s3").start(api)
        yield Served(api, settings, s3, bucket, running)
        assert running.stop() == 0 and running.exits == []
        api.close()


def run(served: Served, **overrides: object):  # type: ignore[no-untyped-def]
    request_id = served.api.submit(job(**overrides)).id
    return wait_until(completed(served.api, request_id), 120, "the job")


def test_images_go_to_the_bucket_with_urls_valid_for_the_retention_time(served: Served) -> None:
    record = run(served, num_images=2)
    assert record.succeeded and record.result is not None
    names = [image.file_name for image in record.result.images]
    assert sorted(served.s3.keys(served.bucket)) == sorted(f"images/{name}" for name in names)
    for image in record.result.images:
        assert image.url is not None and "X-Amz-Expires=600" in image.url
        answer = httpx.get(image.url)
        assert answer.status_code == 200 and answer.headers["content-type"] == image.content_type
        assert len(answer.content) == image.file_size
    files_dir = served.settings.files_dir
    assert not files_dir.exists() or not any(files_dir.iterdir())  # no local file at all


def test_an_outage_shorter_than_the_retry_window_only_delays_the_job(served: Served) -> None:
    served.s3.stop()
    try:
        request_id = served.api.submit(job()).id

        def retrying() -> bool:
            record = served.api.get(request_id)
            return record is not None and any(
                e.message.startswith("Storing the output failed") for e in record.logs
            )

        wait_until(retrying, 60, "the worker to retry storing")
    finally:
        served.s3.start()
    record = wait_until(completed(served.api, request_id), 60, "the job")
    assert record.succeeded and record.result is not None
    assert f"images/{record.result.images[0].file_name}" in served.s3.keys(served.bucket)
    assert httpx.get(record.result.images[0].url or "").status_code == 200


def test_a_longer_outage_fails_the_job_with_the_reason_and_the_worker_goes_on(served: Served) -> None:
    served.s3.stop()
    try:
        record = run(served)
    finally:
        served.s3.start()
    assert record.error is not None and record.error.error_type == "internal_server_error"
    assert record.error.message.startswith("the output could not be stored: object storage unreachable")
    assert record.completed_at is not None and record.started_at is not None
    assert record.completed_at - record.started_at >= RETRY_SECONDS
    assert run(served).succeeded  # the bucket is back: the worker serves again
    assert served.running.thread.is_alive() and served.running.exits == []


def lora_upload(served: Served, seed: int) -> str:
    """A LoRA for the tiny model, uploaded into the bucket; its URL on this server."""
    worker = served.running.worker
    storage = worker.storage
    received = storage.temp_path()
    write_lora(received, worker.runtime.pipe.transformer, seed=seed)
    name = storage.store_upload(received, "application/octet-stream", "style.safetensors", 600)
    return file_url(job().base_url, name)


def test_a_lora_upload_is_read_again_once_the_bucket_is_back(served: Served) -> None:
    lora = lora_upload(served, seed=21)
    served.s3.stop()
    try:
        request_id = served.api.submit(job(loras=(LoraRef(path=lora),))).id

        def retrying() -> bool:
            record = served.api.get(request_id)
            return record is not None and any(
                e.message.startswith("Reading a LoRA from the store failed") for e in record.logs
            )

        wait_until(retrying, 60, "the worker to retry reading the LoRA")
    finally:
        served.s3.start()
    record = wait_until(completed(served.api, request_id), 60, "the job")
    assert record.succeeded and record.attempts == 1


def test_a_lora_upload_unreadable_for_longer_fails_as_the_servers_fault(served: Served) -> None:
    lora = lora_upload(served, seed=22)
    served.s3.stop()
    try:
        record = run(served, loras=(LoraRef(path=lora),))
    finally:
        served.s3.start()
    assert record.error is not None and record.error.status_code == 503  # not the client's 422
    assert record.error.message.startswith("a LoRA could not be read from this server's store")
    assert record.completed_at - record.started_at >= RETRY_SECONDS
    assert run(served, loras=(LoraRef(path=lora),)).succeeded  # the bucket is back
