"""LocalStorage: unguessable names, atomic writes, nothing outside the folder is reachable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from server.jobs import OutputImage
from server.storage import (
    LocalStorage,
    file_name_from_url,
    file_url,
    image_url,
    normalize_content_type,
    upload_extension,
)
from server.storage.signing import UrlSigner, current_signer, load_signing_key


def test_save_path_url_and_delete(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    name = storage.save(b"\xff\xd8data", "jpeg")
    other = storage.save(b"\xff\xd8data", "jpeg")
    assert name != other and name.endswith(".jpeg") and len(name) >= 32 + 5
    assert storage.path(name).read_bytes() == b"\xff\xd8data"
    assert [p.name for p in (tmp_path / "files").iterdir() if p.name.startswith(".")] == []
    assert file_url("https://host:8000/", name) == f"https://host:8000/files/{name}"
    storage.delete(name)
    assert storage.path(name) is None
    storage.delete(name)  # deleting twice is harmless


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "/etc/passwd",
        ".hidden",
        "..%2Fetc%2Fpasswd",
        "a%2F..%2Fb.png",
        "..",
        "",
        "a/b.png",
        "a\\b.png",
        "x" * 40 + ".png\x00",
        "x" * 40 + ".png/",
    ],
)
def test_names_we_could_not_have_made_are_refused(tmp_path: Path, name: str) -> None:
    storage = LocalStorage(tmp_path / "files")
    assert storage.path(name) is None


def test_symlinks_and_missing_files_are_refused(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    link = "A" * 32 + ".png"
    os.symlink(secret, tmp_path / "files" / link)
    assert storage.path(link) is None
    assert storage.path("B" * 32 + ".png") is None


def test_bad_extension_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        LocalStorage(tmp_path).save(b"x", "../png")


def test_image_url_is_the_data_uri_or_the_file_url() -> None:
    inline = OutputImage(
        width=1, height=1, content_type="image/png", data_uri="data:image/png;base64,AA", file_size=1
    )
    stored = OutputImage(
        width=1, height=1, content_type="image/png", file_name="A" * 32 + ".png", file_size=1
    )
    assert image_url("http://h:1", inline) == "data:image/png;base64,AA"
    assert image_url("http://h:1", stored) == "http://h:1/files/" + "A" * 32 + ".png"
    with pytest.raises(ValueError):
        image_url("http://h:1", OutputImage(width=1, height=1, content_type="image/png", file_size=1))


def test_file_name_from_url_reads_back_only_our_own_file_urls() -> None:
    name = "A" * 32 + ".png"
    ours = ["https://flux.local:8443", "http://127.0.0.1:8000/"]
    assert file_name_from_url(file_url("https://flux.local:8443", name), ours) == name
    assert file_name_from_url(f"HTTP://127.0.0.1:8000/files/{name}", ours) == name
    for url in [
        f"https://other.host/files/{name}",  # someone else's server: fetched over HTTP
        f"https://flux.local:8443/files/{name}?x=1",
        f"https://flux.local:8443/files/../{name}",
        "https://flux.local:8443/files/queue.sqlite3",
        f"https://flux.local:8443/run/files/{name}",
        "not a url",
    ]:
        assert file_name_from_url(url, ours) is None, url


def test_signed_file_urls_are_made_in_a_signers_context_and_read_back_as_ours() -> None:
    name = "B" * 32 + ".png"
    signer = UrlSigner(b"k" * 32, lifetime=3600)
    token = current_signer.set(signer)
    try:
        url = file_url("https://flux.local:8443", name)
        upload = file_url("https://flux.local:8443", name, expires_at=2_000_000_000)
    finally:
        current_signer.reset(token)
    segment = url.removeprefix("https://flux.local:8443/files/").removesuffix(f"/{name}")
    assert signer.verify(name, segment) is None and url.endswith(".png")
    assert upload == f"https://flux.local:8443/files/{signer.segment(name, 2_000_000_000)}/{name}"
    assert file_url("https://flux.local:8443", name) == f"https://flux.local:8443/files/{name}"  # no signer
    inactive = current_signer.set(UrlSigner(b"k" * 32, lifetime=3600, active=lambda: False))
    try:
        assert file_url("https://flux.local:8443", name) == f"https://flux.local:8443/files/{name}"
    finally:
        current_signer.reset(inactive)
    # As an input, a signed URL of ours names the file (read from the store, not over HTTP).
    ours = ["https://flux.local:8443"]
    assert file_name_from_url(url, ours) == name
    for other in (
        f"https://flux.local:8443/files/not-a-signature/{name}",
        f"https://elsewhere/files/{segment}/{name}",
    ):
        assert file_name_from_url(other, ours) is None


def test_a_signature_is_refused_altered_expired_or_for_another_name() -> None:
    signer = UrlSigner(b"k" * 32, lifetime=3600)
    name, now = "C" * 32 + ".png", 1_800_000_000.0
    good = signer.segment(name, now=now)
    assert int(good.split(".")[0]) % 3600 == 0 and int(good.split(".")[0]) >= now + 3600  # rounded up
    assert signer.verify(name, good, now=now) is None
    assert signer.verify("D" * 32 + ".png", good, now=now) == "This file URL's signature is not valid"
    assert signer.verify(name, good, now=now + 7201) == "This file URL has expired"
    assert "not signed" in signer.verify(name, None, now=now)
    other_key = UrlSigner(b"x" * 32, lifetime=3600)
    assert other_key.verify(name, good, now=now) == "This file URL's signature is not valid"


def test_the_signing_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    first = load_signing_key(None, tmp_path)
    assert load_signing_key(None, tmp_path) == first and len(first) >= 48
    assert oct((tmp_path / "url-signing.key").stat().st_mode & 0o777) == "0o600"
    assert load_signing_key("configured", tmp_path) == b"configured"
    assert [p.name for p in tmp_path.iterdir()] == ["url-signing.key"]


def test_uploads_keep_their_type_and_expire(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    body = storage.temp_path()
    body.write_bytes(b"weights")
    name = storage.store_upload(
        body, "Application/Octet-Stream; x=1", "dir/my lora.safetensors", 100, now=1000
    )
    assert name.endswith(".safetensors") and not body.exists()
    info = storage.file_info(name, now=1050)
    assert info is not None and info.content_type == "application/octet-stream" and info.expires_at == 1100
    assert info.path.read_bytes() == b"weights"
    assert storage.file_info(name, now=1100) is None  # expired: not served even before the purge
    assert storage.purge_uploads(now=1100) == 1
    assert storage.path(name) is None
    assert list((tmp_path / "files" / ".meta").iterdir()) == []


def test_abandoned_reservations_and_their_parts_are_purged(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    reservation = storage.reserve("image/png", None, 100, now=time.time())
    part = storage.temp_path()
    part.write_bytes(b"p1")
    storage.save_part(reservation, 1, part, "etag-1")
    assert storage.parts(reservation) == {1: (2, "etag-1")}
    assert storage.reservation(reservation.upload_id, reservation.file_name) == reservation
    assert storage.reservation(reservation.upload_id, "B" * 32 + ".png") is None  # another file
    later = reservation.deadline + 1
    assert storage.reservation(reservation.upload_id, reservation.file_name, now=later) is None
    assert storage.purge_uploads(now=later) == 1
    assert not (tmp_path / "files" / ".parts" / reservation.upload_id).exists()
    assert list((tmp_path / "files" / ".uploads").iterdir()) == []
    with pytest.raises(ValueError):
        storage.save_part(reservation, 0, part, "x")


@pytest.mark.parametrize(
    ("content_type", "original", "extension"),
    [
        ("image/png", "a.PNG", "png"),
        ("image/jpeg", None, "jpg"),
        ("application/octet-stream", "style.safetensors", "safetensors"),
        ("application/octet-stream", None, "bin"),
        ("image/png", "../../evil.png/..", "png"),  # no usable suffix: from the type
        ("image/png", "x.a-b", "png"),
    ],
)
def test_upload_extension(content_type: str, original: str | None, extension: str) -> None:
    assert upload_extension(content_type, original) == extension


def test_content_types_are_normalized() -> None:
    assert normalize_content_type("Image/PNG; charset=binary") == "image/png"
    for bad in (None, "", "text", "a/b/c", "<script>/x", "x" * 300 + "/y"):
        assert normalize_content_type(bad) == "application/octet-stream"


def test_own_file_reads_back_our_urls_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    name = storage.save(b"\x89PNG", "png")
    ours = ("http://127.0.0.1:8000", None)
    assert storage.own_file(file_url("http://127.0.0.1:8000", name), ours) == storage.path(name)
    assert storage.own_file(f"http://elsewhere/files/{name}", ours) is None
    storage.delete(name)
    with pytest.raises(FileNotFoundError):
        storage.own_file(file_url("http://127.0.0.1:8000", name), ours)
