"""Generated files on the local disk, under names nobody can guess, and the URLs they have.

Only names this module could have produced are ever served: `path()` refuses anything with a
separator, a leading dot, a traversal, or a symlink, so a URL cannot reach outside the folder.
Every URL of a stored file is built here (`file_url`, `image_url`) and read back here
(`file_name_from_url`), so the files route, the protocol adapters and the input loaders agree.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from server.jobs import OutputImage

# Where the files route serves stored files: {base_url}/files/{name}.
FILES_PATH = "/files"

# secrets.token_urlsafe(24) -> 32 characters of [A-Za-z0-9_-]; then one short extension.
_FILE_NAME = re.compile(r"[A-Za-z0-9_-]{16,64}\.[a-z0-9]{1,8}")


class LocalStorage:
    def __init__(self, files_dir: Path) -> None:
        self.files_dir = Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, extension: str) -> str:
        """Write `data` under a fresh unguessable name; the file appears complete or not at all."""
        extension = extension.lower().lstrip(".")
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        if not _FILE_NAME.fullmatch(name):
            raise ValueError(f"bad file extension {extension!r}")
        final = self.files_dir / name
        partial = self.files_dir / f".{name}.partial"
        with open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, final)
        return name

    def path(self, file_name: str) -> Path | None:
        """The file for a name we could have made, or None (bad name, missing, not a plain file)."""
        if not _FILE_NAME.fullmatch(file_name):
            return None
        candidate = self.files_dir / file_name
        try:
            if candidate.is_symlink() or not candidate.is_file():
                return None
        except OSError:
            return None
        return candidate

    def delete(self, file_name: str) -> None:
        candidate = self.path(file_name)
        if candidate is not None:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()


def file_url(base_url: str, file_name: str) -> str:
    """The public URL of a stored file, on the base URL the client used (or --public-url)."""
    return f"{base_url.rstrip('/')}{FILES_PATH}/{file_name}"


def image_url(base_url: str, image: OutputImage) -> str:
    """What a client gets for a generated image: its data URI when inline, else its file URL."""
    if image.data_uri:
        return image.data_uri
    if not image.file_name:
        raise ValueError("an output image has neither a data URI nor a file name")
    return file_url(base_url, image.file_name)


def file_name_from_url(url: str, base_urls: Iterable[str]) -> str | None:
    """The stored file's name if `url` is one of our own file URLs on one of `base_urls`.

    Lets an input URL pointing at this server (an uploaded image, mask or LoRA) be read from
    the disk instead of over HTTP, which could loop through a proxy or fail on a private CA.
    """
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    origin = f"{parts.scheme}://{parts.netloc}".lower()
    if not any(origin == base.rstrip("/").lower() for base in base_urls if base):
        return None
    prefix = FILES_PATH + "/"
    if parts.query or parts.fragment or not parts.path.startswith(prefix):
        return None
    name = parts.path[len(prefix) :]
    return name if _FILE_NAME.fullmatch(name) else None
