"""LocalStorage: unguessable names, atomic writes, nothing outside the folder is reachable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.storage import LocalStorage


def test_save_path_url_and_delete(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    name = storage.save(b"\xff\xd8data", "jpeg")
    other = storage.save(b"\xff\xd8data", "jpeg")
    assert name != other and name.endswith(".jpeg") and len(name) >= 32 + 5
    assert storage.path(name).read_bytes() == b"\xff\xd8data"
    assert [p.name for p in (tmp_path / "files").iterdir() if p.name.startswith(".")] == []
    assert storage.url("https://host:8000/", name) == f"https://host:8000/files/{name}"
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
