"""What every store of files shares: the names it hands out, the URLs of those names, an
upload's reservation, and the interface the API and the workers use (`Storage`).

Only names this package could have produced are ever served or read back (`FILE_NAME`): a
random token and one short extension, never a separator, a leading dot or a traversal. Every
URL of a stored file is built here (`file_url`, `image_url`) and read back here
(`file_name_from_url`), so the files route, the protocol adapters and the input loaders agree.
Two implementations: `LocalStorage` (a folder, server/storage/local.py, the default) and
`S3Storage` (a bucket, server/storage/s3.py); `open_storage` in server/storage/__init__.py
picks one from the settings.
"""

from __future__ import annotations

import mimetypes
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from server.jobs import CONTENT_TYPES, OutputImage
from server.storage.signing import SIGNATURE_SEGMENT, signature_segment

# Where the files route serves stored files: {base_url}/files/{name}.
FILES_PATH = "/files"
# secrets.token_urlsafe(24) -> 32 characters of [A-Za-z0-9_-]; then one short extension.
FILE_NAME = re.compile(r"[A-Za-z0-9_-]{16,64}\.[a-z0-9]{1,16}")
UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{32,64}")
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_EXTENSION = re.compile(r"[a-z0-9]{1,16}")
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# An upload that was started must be finished within this many seconds.
UPLOAD_WINDOW_SECONDS = 3600.0
# Most parts a multipart upload may have (S3's limit, which fal's multipart protocol mirrors).
MAX_PARTS = 10_000
IMAGE_TYPES = {**{f".{ext}": kind for ext, kind in CONTENT_TYPES.items()}, ".jpg": "image/jpeg"}


@dataclass(frozen=True)
class StoredFile:
    """A servable file: on the disk (`path`) or in a bucket (`url`, where to redirect)."""

    path: Path | None
    content_type: str
    expires_at: float | None  # None: a generated image, deleted with its request
    url: str | None = None


@dataclass(frozen=True)
class Reservation:
    """An upload that was started: where its bytes go and what the finished file will be."""

    upload_id: str  # unguessable: knowing it is the permission to send the bytes
    file_name: str  # the stored name, already in the file URL handed to the client
    content_type: str
    original_name: str | None
    expires_at: float  # when the finished file expires
    deadline: float  # the upload must be finished by then
    multipart_id: str | None = None  # a bucket's own multipart upload id (S3Storage)


class StorageUnavailable(OSError):
    """The store cannot be reached now (a bucket's endpoint down, timing out or answering
    5xx): trying again later may work, unlike a refusal or a full disk."""


class Storage(Protocol):
    """Generated images and client uploads, kept under names nobody can guess.

    Every method blocks (disk or network): call them in a thread from the event loop. Write
    failures raise OSError (StorageUnavailable when retrying may help) and leave nothing
    half-written behind."""

    # generated images
    def save(self, data: bytes, extension: str) -> str: ...
    def read_url(self, file_name: str, lifetime: float) -> str | None:
        """Where clients read a stored file when not on this server's files route (a bucket's
        presigned URL valid for `lifetime` seconds, or its public URL), else None."""
        ...

    def delete(self, file_name: str) -> None: ...
    def file_info(self, file_name: str, now: float | None = None) -> StoredFile | None: ...

    # this server's own files named by an input URL
    def read_own(self, url: str, base_urls: Iterable[str | None], max_bytes: int) -> bytes | None:
        """At most `max_bytes` of the file behind one of our own URLs; None for another URL.
        Raises FileNotFoundError for one of ours that is gone."""
        ...

    def local_copy(
        self, url: str, base_urls: Iterable[str | None], cache_dir: Path, *, fetch: bool = True
    ) -> Path | None:
        """A file on this machine with the content behind one of our own URLs (a LoRA),
        copied into `cache_dir` if it lives elsewhere (`fetch=False`: only a copy made
        before); None for another URL, or when there is no such copy."""
        ...

    # uploads
    def temp_path(self) -> Path: ...
    def reserve(
        self,
        content_type: str | None,
        original_name: str | None,
        lifetime: float,
        now: float | None = None,
        *,
        multipart: bool = False,
    ) -> Reservation: ...
    def reservation(self, upload_id: str, file_name: str, now: float | None = None) -> Reservation | None: ...
    def save_part(self, reservation: Reservation, part_number: int, received: Path, etag: str) -> str:
        """Keep part `part_number` (sent again: replaced); returns the ETag to answer with."""
        ...

    def parts(self, reservation: Reservation) -> dict[int, tuple[int, str]]: ...
    def complete_parts(self, reservation: Reservation, part_numbers: list[int]) -> str:
        """Join the parts in this order into the reserved file; returns its name. Raises
        ValueError for parts this store cannot join (the message is for the client)."""
        ...

    def finish(self, reservation: Reservation, received: Path) -> str: ...
    def store_upload(
        self,
        received: Path,
        content_type: str | None,
        original_name: str | None,
        lifetime: float,
        now: float | None = None,
    ) -> str: ...
    def purge_uploads(self, now: float | None = None) -> int: ...

    # orphans
    def generated_images(self, stored_after: float, stored_before: float) -> dict[str, float]: ...


# --- names --------------------------------------------------------------------------------------


def new_name(extension: str) -> str:
    name = f"{secrets.token_urlsafe(24)}.{extension.lower().lstrip('.')}"
    if not FILE_NAME.fullmatch(name):
        raise ValueError(f"bad file extension {extension!r}")
    return name


def new_reservation(
    content_type: str | None, original_name: str | None, lifetime: float, now: float | None = None
) -> Reservation:
    now = time.time() if now is None else now
    kind = normalize_content_type(content_type)
    return Reservation(
        upload_id=secrets.token_urlsafe(32),
        file_name=new_name(upload_extension(kind, original_name)),
        content_type=kind,
        original_name=clean_original_name(original_name),
        expires_at=now + lifetime,
        deadline=now + UPLOAD_WINDOW_SECONDS,
    )


def image_content_type(file_name: str) -> str | None:
    """A generated image's content type from its extension; None for another file."""
    return IMAGE_TYPES.get(Path(file_name).suffix)


def normalize_content_type(value: str | None) -> str:
    """`Image/PNG; charset=x` -> `image/png`; anything unparsable -> application/octet-stream."""
    kind = (value or "").split(";", 1)[0].strip().lower()
    return kind if _CONTENT_TYPE.fullmatch(kind) else DEFAULT_CONTENT_TYPE


def upload_extension(content_type: str, original_name: str | None) -> str:
    """The stored file's extension: the original name's (`lora.safetensors` stays
    `.safetensors`, which loaders look at), else one for the content type, else `bin`."""
    suffix = Path(original_name or "").suffix.lower().lstrip(".")
    if _EXTENSION.fullmatch(suffix):
        return suffix
    guessed = (mimetypes.guess_extension(content_type) or "").lstrip(".")
    return guessed if _EXTENSION.fullmatch(guessed) else "bin"


def clean_original_name(name: str | None) -> str | None:
    if not name:
        return None
    # Only the last path component, printable, bounded: it is kept for information only.
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = "".join(ch for ch in base if ch.isprintable())[:255]
    return cleaned or None


# --- URLs -------------------------------------------------------------------------------------


def plain_file_url(base_url: str, file_name: str) -> str:
    return f"{base_url.rstrip('/')}{FILES_PATH}/{file_name}"


def file_url(base_url: str, file_name: str, expires_at: float | None = None) -> str:
    """The public URL of a stored file, on the base URL the client used (or --public-url);
    signed, until `expires_at` (default: retention from now), when auth is on
    (server/storage/signing.py)."""
    segment = signature_segment(file_name, expires_at)
    if segment is None:
        return plain_file_url(base_url, file_name)
    return f"{base_url.rstrip('/')}{FILES_PATH}/{segment}/{file_name}"


def upload_url(base_url: str, reservation: Reservation) -> str:
    """Where the bytes of an initiated upload are PUT (the URL is the permission)."""
    return f"{plain_file_url(base_url, reservation.file_name)}/upload/{reservation.upload_id}"


def multipart_url(base_url: str, reservation: Reservation) -> str:
    """The base of a multipart upload's part URLs (`/<n>`) and its `/complete` URL; fal_client
    builds the same URL from the file URL and the upload id."""
    return f"{plain_file_url(base_url, reservation.file_name)}/multipart/{reservation.upload_id}"


def image_url(base_url: str, image: OutputImage) -> str:
    """What a client gets for a generated image: its data URI when inline, the bucket URL the
    worker stored with it (S3Storage), else its file URL on this server."""
    if image.data_uri:
        return image.data_uri
    if image.url:
        return image.url
    if not image.file_name:
        raise ValueError("an output image has neither a data URI nor a file name")
    return file_url(base_url, image.file_name, image.url_expires_at)


def file_name_from_url(url: str, base_urls: Iterable[str | None]) -> str | None:
    """The stored file's name if `url` is one of our own file URLs on one of `base_urls`.

    Lets an input URL pointing at this server (an uploaded image, mask or LoRA) be read from
    the store instead of over HTTP, which could loop through a proxy or fail on a private CA.
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
    # A signed URL (`<exp>.<sig>/<name>`) names the file too: an input is read from the store by
    # its unguessable name (the signature guards GET /files, not this path).
    segment, slash, rest = name.partition("/")
    if slash and SIGNATURE_SEGMENT.fullmatch(segment):
        name = rest
    return name if FILE_NAME.fullmatch(name) else None
