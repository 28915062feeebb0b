"""S3Storage against a real S3 server (SeaweedFS, tests/s3_server.py, credentials enforced):
objects, presigned and public URLs a plain HTTP client can read, our own URLs read back from
the bucket, uploads in one piece and in parts, the purge of expired uploads and abandoned
reservations, the orphan listing, what a wrong secret or a stopped server raises, and the
start-up check's one line for wrong credentials and a missing bucket."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from server.config import Settings
from server.storage import StorageUnavailable, file_url, open_storage
from server.storage.s3 import MIN_PART_BYTES, S3Storage
from server.storage.s3_client import BucketLocation
from server.supervisor.preflight import ConfigError, check_storage
from tests.s3_server import S3Server, running_s3_server
from tests.support import free_port

BASE = "https://flux.example:8000"  # this server's own address, as a request would give it


def s3_storage(tmp_path: Path, bucket: str, prefix: str = "outputs", **options: object) -> S3Storage:
    settings = Settings(
        data_dir=tmp_path / "data", storage_url=f"s3://{bucket}/{prefix}", retention_seconds=3600, **options
    )
    storage = open_storage(settings)
    assert isinstance(storage, S3Storage)
    return storage


@pytest.fixture
def storage(s3_env, s3_server: S3Server, tmp_path: Path) -> S3Storage:
    return s3_storage(tmp_path, s3_server.fresh_bucket())


def spooled(storage: S3Storage, data: bytes) -> Path:
    path = storage.temp_path()
    path.write_bytes(data)
    return path


def test_a_saved_image_is_read_by_anyone_with_its_presigned_url_and_nobody_without(
    storage: S3Storage, s3_server: S3Server
) -> None:
    name = storage.save(b"\x89PNG\r\n\x1a\n-image", "png")
    assert s3_server.keys(storage.bucket) == [f"outputs/{name}"]
    url = storage.read_url(name, 60)
    assert url is not None and "X-Amz-Expires=60" in url and "X-Amz-Signature=" in url
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.content == b"\x89PNG\r\n\x1a\n-image"
    assert answer.headers["content-type"] == "image/png"
    assert httpx.get(url.split("?")[0]).status_code == 403  # the bucket is not public
    tampered = url.replace("X-Amz-Expires=60", "X-Amz-Expires=61")
    assert httpx.get(tampered).status_code == 403
    info = storage.file_info(name)
    assert info is not None and info.path is None and info.content_type == "image/png"
    assert info.expires_at is None and info.url is not None and "X-Amz-Expires=" in info.url
    storage.delete(name)
    assert storage.file_info(name) is None and s3_server.keys(storage.bucket) == []
    assert httpx.get(url).status_code == 404


def test_a_presigned_url_cannot_outlive_what_sigv4_allows(storage: S3Storage) -> None:
    name = storage.save(b"x", "png")
    assert storage.read_url(name, 7 * 24 * 3600) is not None
    assert storage.read_url(name, 7 * 24 * 3600 + 1) is None  # the files route redirects instead


def test_a_public_base_replaces_presigning(s3_env, s3_server: S3Server, tmp_path: Path) -> None:
    storage = s3_storage(tmp_path, s3_server.fresh_bucket(), storage_public_url="https://cdn.example/media/")
    name = storage.save(b"x", "jpeg")
    assert storage.read_url(name, 60) == f"https://cdn.example/media/outputs/{name}"
    assert storage.own_name(f"https://cdn.example/media/outputs/{name}", []) == name


def test_our_urls_are_read_back_from_the_bucket_and_no_others(storage: S3Storage) -> None:
    name = storage.save(b"0123456789", "png")
    presigned = storage.read_url(name, 60)
    assert presigned is not None
    for url in (presigned, presigned.split("?")[0], file_url(BASE, name)):
        assert storage.own_name(url, [BASE]) == name
        assert storage.read_own(url, [BASE], 4) == b"0123"
    elsewhere = presigned.replace(f"/{storage.bucket}/", "/another-bucket/")
    for url in (elsewhere, f"http://elsewhere/files/{name}", presigned.replace("outputs/", "other/")):
        assert storage.own_name(url, [BASE]) is None and storage.read_own(url, [BASE], 4) is None
    storage.delete(name)
    with pytest.raises(FileNotFoundError, match="not found on this server"):
        storage.read_own(presigned, [BASE], 4)


def test_an_upload_lives_until_its_expiry_then_the_purge_deletes_it(
    storage: S3Storage, s3_server: S3Server
) -> None:
    now = time.time()
    short = storage.store_upload(spooled(storage, b"short"), "text/plain", "a.txt", 60, now=now)
    long = storage.store_upload(spooled(storage, b"long"), "Image/PNG", "b.png", 3600, now=now)
    assert list(storage.spool_dir.iterdir()) == []  # the spooled bodies went to the bucket
    info = storage.file_info(short)
    assert (
        info is not None and info.content_type == "text/plain" and info.expires_at == pytest.approx(now + 60)
    )
    assert info.url is not None and httpx.get(info.url).content == b"short"
    assert storage.file_info(short, now=now + 61) is None  # expired: no longer served
    assert storage.generated_images(0, now + 3600) == {}  # uploads are not generated images
    assert storage.purge_uploads(now=now + 61) == 1
    keys = s3_server.keys(storage.bucket)
    assert f"outputs/{short}" not in keys and f"outputs/{long}" in keys
    assert [k for k in keys if "/.expiry/" in k] == [k for k in keys if k.endswith(f"-{long}")]
    assert storage.purge_uploads(now=now + 3601) == 1 and s3_server.keys(storage.bucket) == []


def test_a_multipart_upload_is_the_buckets_multipart_upload(storage: S3Storage, s3_server: S3Server) -> None:
    reservation = storage.reserve("application/octet-stream", "style.safetensors", 3600, multipart=True)
    assert reservation.multipart_id and reservation.file_name.endswith(".safetensors")
    assert storage.reservation(reservation.upload_id, reservation.file_name) == reservation
    first, last = b"a" * MIN_PART_BYTES, b"tail"
    etags = {
        n: storage.save_part(reservation, n, spooled(storage, data), "md5")
        for n, data in ((2, last), (1, first))
    }
    parts = storage.parts(reservation)
    assert parts == {1: (MIN_PART_BYTES, etags[1]), 2: (4, etags[2])}
    assert storage.complete_parts(reservation, [1, 2]) == reservation.file_name
    assert storage.reservation(reservation.upload_id, reservation.file_name) is None  # closed
    info = storage.file_info(reservation.file_name)
    assert info is not None and info.url is not None
    body = httpx.get(info.url).content
    assert len(body) == MIN_PART_BYTES + 4 and body.endswith(b"tail")
    assert list(storage.spool_dir.iterdir()) == []


def test_parts_the_bucket_cannot_join_are_refused_before_it_is_asked(storage: S3Storage) -> None:
    reservation = storage.reserve(None, None, 3600, multipart=True)
    for n in (1, 2):
        storage.save_part(reservation, n, spooled(storage, b"small"), "md5")
    with pytest.raises(ValueError, match="at least 5242880 bytes"):
        storage.complete_parts(reservation, [1, 2])
    single = storage.reserve(None, None, 3600)  # started for one PUT, not in parts
    with pytest.raises(ValueError, match="not started as a multipart upload"):
        storage.save_part(single, 1, spooled(storage, b"x"), "md5")
    assert list(storage.spool_dir.iterdir()) == []


def test_an_abandoned_reservation_and_its_parts_are_purged(storage: S3Storage, s3_server: S3Server) -> None:
    reservation = storage.reserve(None, None, 60, multipart=True)
    storage.save_part(reservation, 1, spooled(storage, b"part"), "md5")
    assert storage.purge_uploads(now=time.time() + 60) == 0  # within its upload window
    assert storage.purge_uploads(now=reservation.deadline + 1) == 1
    assert s3_server.keys(storage.bucket) == []
    uploads = s3_server.client().list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
    assert uploads == []  # the bucket's multipart upload was aborted, its parts with it


def test_generated_images_lists_images_written_in_the_window_only(storage: S3Storage) -> None:
    first = storage.save(b"1", "png")
    storage.store_upload(spooled(storage, b"u"), "image/png", "u.png", 3600)
    found = storage.generated_images(0, time.time() + 60)
    assert set(found) == {first}
    assert storage.generated_images(found[first], time.time() + 60) == {}


def test_a_wrong_secret_is_refused_and_a_stopped_server_is_unavailable(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.fresh_bucket()
    for name, value in s3_server.env(secret="wrong").items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PermissionError, match="SignatureDoesNotMatch"):
        s3_storage(tmp_path, bucket).save(b"x", "png")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(StorageUnavailable, match="unreachable"):
        s3_storage(tmp_path, bucket).save(b"x", "png")


def test_the_start_up_check_names_what_is_wrong_in_one_line(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_server.fresh_bucket()

    def problem(storage_url: str, **env: str) -> str | None:
        for name, value in {**s3_server.env(), **env}.items():
            monkeypatch.setenv(name, value)
        try:
            check_storage(Settings(data_dir=tmp_path, storage_url=storage_url))
        except ConfigError as exc:
            return str(exc)
        return None

    assert problem(f"s3://{bucket}/p") is None
    assert s3_server.keys(bucket) == []  # the probe object was deleted
    wrong = problem(f"s3://{bucket}/p", AWS_SECRET_ACCESS_KEY="wrong")
    assert wrong is not None and "\n" not in wrong
    assert f"s3://{bucket}/p/" in wrong and "access denied" in wrong and "AWS_SECRET_ACCESS_KEY" in wrong
    missing = problem("s3://no-such-bucket-here/p")
    assert missing is not None and missing.endswith("the bucket does not exist") and "\n" not in missing
    assert "not an s3://bucket/prefix URL" in (problem("s3:///p") or "")


def test_local_files_stay_the_default(tmp_path: Path) -> None:
    storage = open_storage(Settings(data_dir=tmp_path))
    assert type(storage).__name__ == "LocalStorage"
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        Settings(data_dir=tmp_path, storage_url="/mnt/bucket")
    assert BucketLocation.parse("s3://bucket") == BucketLocation("bucket", "")
    assert BucketLocation.parse("s3://bucket/a/b/") == BucketLocation("bucket", "a/b/")


def test_a_bucket_outage_and_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server of its own, stopped and started again: the same store works again after it."""
    with running_s3_server(tmp_path / "weed") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        storage = s3_storage(tmp_path, server.fresh_bucket())
        name = storage.save(b"before", "png")
        server.stop()
        with pytest.raises(StorageUnavailable):
            storage.save(b"during", "png")
        server.start()
        assert storage.read_own(file_url(BASE, name), [BASE], 100) == b"before"
        assert storage.file_info(storage.save(b"after", "png")) is not None
