"""A LoRA uploaded to this server while its files live in a bucket (SeaweedFS, tests/s3_server.py):
named by its /files/ URL or its presigned bucket URL, it is copied once from the bucket into
the LoRA cache (bounded like downloads), never fetched through the API; the claim's cheap
look-up does not copy it; an expired upload is a LoraError naming the path."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from models.lora.errors import LoraError
from server.config import Settings
from server.jobs import Job, LoraRef
from server.storage import StorageUnavailable, file_url, open_storage
from server.storage.s3 import S3Storage
from server.worker.lora.cache import DownloadCache
from server.worker.lora.jobs import JobLoras
from server.worker.lora.sources import LoraResolver
from tests.s3_server import S3Server
from tests.support import free_port

BASE = "https://flux.example"
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 64


@pytest.fixture
def store(s3_env, s3_server: S3Server, tmp_path: Path) -> S3Storage:
    settings = Settings(data_dir=tmp_path / "data", storage_url=f"s3://{s3_server.fresh_bucket()}/loras")
    storage = open_storage(settings)
    assert isinstance(storage, S3Storage)
    return storage


def upload(store: S3Storage, lifetime: float = 3600) -> str:
    received = store.temp_path()
    received.write_bytes(WEIGHTS)
    return store.store_upload(received, "application/octet-stream", "style.safetensors", lifetime)


def test_an_uploaded_lora_is_copied_once_from_the_bucket(store: S3Storage, tmp_path: Path) -> None:
    cache = DownloadCache(tmp_path / "cache", max_total_bytes=10**6, max_file_bytes=10**6, timeout=5)
    resolver = LoraResolver(cache=cache, storage=store)
    name = upload(store)
    presigned = store.read_url(name, 3600)
    assert presigned is not None
    with pytest.raises(LoraError, match="not downloaded yet"):
        resolver.resolve(presigned, own_base_urls=[BASE], download=False)  # the claim's look-up
    assert list(cache.folder.iterdir()) == []
    first = resolver.resolve(file_url(BASE, name), own_base_urls=[BASE])
    assert first.source == "upload" and first.file == cache.folder / name
    assert first.file.read_bytes() == WEIGHTS
    written = first.file.stat().st_mtime_ns
    again = resolver.resolve(presigned, own_base_urls=[BASE])  # the bucket URL: the same copy
    assert again.file == first.file and again.file.stat().st_mtime_ns == written
    assert resolver.resolve(presigned, own_base_urls=[BASE], download=False).file == first.file


def test_an_expired_upload_is_a_lora_error(store: S3Storage, tmp_path: Path) -> None:
    cache = DownloadCache(tmp_path / "cache", max_total_bytes=10**6, max_file_bytes=10**6, timeout=5)
    resolver = LoraResolver(cache=cache, storage=store)
    name = upload(store, lifetime=-1)  # expired as soon as stored
    with pytest.raises(LoraError, match="no such file"):
        resolver.resolve(file_url(BASE, name), own_base_urls=[BASE])


def test_a_bucket_outage_is_waited_out_not_the_requests_fault(
    store: S3Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`JobLoras.specs_retrying` against a bucket that cannot be reached (nothing listens on
    its endpoint): it retries and says so while the window lasts, gives the job back when the
    worker stops, and raises StorageUnavailable (never a LoraError, the client's 422) after."""
    name = upload(store)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    job = Job(prompt="p", width=64, height=64, loras=(LoraRef(path=file_url(BASE, name)),), base_url=BASE)

    def loras(retry_seconds: float) -> JobLoras:
        settings = Settings(
            data_dir=tmp_path / "data",
            storage_url=f"s3://{store.bucket}/{store.prefix.rstrip('/')}",
            storage_retry_seconds=retry_seconds,
        )
        return JobLoras(settings, open_storage(settings))

    notes: list[str] = []
    stopping = threading.Event()

    def note(line: str) -> None:
        notes.append(line)
        stopping.set()  # the worker is asked to stop while it waits

    assert loras(60).specs_retrying(job, stopping, note) is None
    assert len(notes) == 1 and notes[0].startswith("Reading a LoRA from the store failed")
    with pytest.raises(StorageUnavailable):
        loras(0).specs_retrying(job, threading.Event(), notes.append)
    assert len(notes) == 1  # no window: nothing to wait for, nothing said
