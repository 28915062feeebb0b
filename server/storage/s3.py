"""Generated images and client uploads in an S3-compatible bucket (`--storage-url
s3://bucket/prefix`): AWS S3, MinIO, Ceph RGW, SeaweedFS, a cloud's S3 API. Boxes then share
no directory at all; the connection is server/storage/s3_client.py.

Layout under the prefix:

    <name>                                  a generated image or a finished upload; an upload
                                            carries its expiry in its metadata (x-amz-meta-expires-at)
    .expiry/<expiry, 12 digits>-<name>      an empty marker per upload: listed in expiry order,
                                            so the purge reads one listing, not every object
    .reservations/<upload id>.json          an upload started and not finished (a reservation;
                                            a multipart one holds the bucket's multipart upload id)

Clients read files from the bucket, not through the API: a generated image's URL is presigned
(valid for the retention time, at most SigV4's 7 days) or, with `--storage-public-url`, that
base plus the object's key. Upload bodies still pass through the API, which enforces the size
limit and the upload's lifetime, and streams them to the bucket: a body is spooled to a local
file, then sent; a fal multipart upload is a multipart upload of the bucket, part for part.
The API never holds a whole upload in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from server.storage.base import (
    FILE_NAME,
    MAX_PARTS,
    UPLOAD_ID,
    UPLOAD_WINDOW_SECONDS,
    Reservation,
    StoredFile,
    file_name_from_url,
    image_content_type,
    new_name,
    new_reservation,
    normalize_content_type,
)
from server.storage.s3_client import BucketLocation, translate

# The longest a SigV4 presigned URL may live.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
# S3's smallest part, but for the last one: a multipart upload with smaller parts cannot be joined.
MIN_PART_BYTES = 5 * 1024 * 1024
_EXPIRY = ".expiry/"
_UPLOADS = ".reservations/"  # not ".uploads/": SeaweedFS hides folders of that name
_EXPIRY_DIGITS = 12
_DELETE_BATCH = 1000  # DeleteObjects' limit


class S3Storage:
    def __init__(
        self,
        client: Any,
        location: BucketLocation,
        *,
        spool_dir: Path,
        retention_seconds: float,
        public_url: str | None = None,
    ) -> None:
        self.client = client
        self.bucket, self.prefix = location.bucket, location.prefix
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.retention_seconds = retention_seconds
        self.public_url = public_url.rstrip("/") if public_url else None
        # What our objects' URLs start with, up to the name (presigned, or public): input URLs
        # that do are read from the bucket (presigning is local: no request is made here).
        probe = self._presign("x").split("?", 1)[0]
        self._object_bases = [probe.removesuffix("x")]
        if self.public_url:
            self._object_bases.append(f"{self.public_url}/{quote(self.prefix)}")

    # --- generated images ---------------------------------------------------------------
    def save(self, data: bytes, extension: str) -> str:
        name = new_name(extension)
        kind = image_content_type(name) or "application/octet-stream"
        self._call("put_object", Key=self._key(name), Body=data, ContentType=kind)
        return name

    def read_url(self, file_name: str, lifetime: float) -> str | None:
        """The URL clients read `file_name` at: public, or presigned for `lifetime` seconds;
        None when a presigned URL cannot live that long (the files route then redirects)."""
        if self.public_url:
            return f"{self.public_url}/{quote(self._key(file_name))}"
        if lifetime > MAX_PRESIGN_SECONDS:
            return None
        return self._presign(file_name, max(1, math.ceil(lifetime)))

    def delete(self, file_name: str) -> None:
        if FILE_NAME.fullmatch(file_name):
            self._call("delete_object", Key=self._key(file_name))

    def file_info(self, file_name: str, now: float | None = None) -> StoredFile | None:
        if not FILE_NAME.fullmatch(file_name):
            return None
        try:
            head = self._call("head_object", Key=self._key(file_name))
        except FileNotFoundError:
            return None
        now = time.time() if now is None else now
        expires_at = _expiry_of(head)
        if expires_at is None:  # a generated image: kept for the retention time
            kind = image_content_type(file_name)
            if kind is None:
                return None
            lifetime = head["LastModified"].timestamp() + self.retention_seconds - now
        else:
            if expires_at <= now:
                return None
            kind = normalize_content_type(head.get("ContentType"))
            lifetime = expires_at - now
        url = self.read_url(file_name, min(max(lifetime, 1.0), MAX_PRESIGN_SECONDS))
        return StoredFile(None, kind, expires_at, url=url)

    # --- this server's own files named by an input URL ------------------------------------
    def own_name(self, url: str, base_urls: Iterable[str | None]) -> str | None:
        """The stored name behind one of our URLs: the files route's, or the bucket's own
        (presigned or public; the signature is not needed, we read with our credentials)."""
        name = file_name_from_url(url, base_urls)
        if name is not None:
            return name
        bare = url.strip().split("?", 1)[0].split("#", 1)[0]
        for base in self._object_bases:
            if bare.startswith(base) and FILE_NAME.fullmatch(bare[len(base) :]):
                return bare[len(base) :]
        return None

    def read_own(self, url: str, base_urls: Iterable[str | None], max_bytes: int) -> bytes | None:
        name = self.own_name(url, base_urls)
        if name is None:
            return None
        with self._open_live(name, url, f"bytes=0-{max(max_bytes - 1, 0)}") as body:
            return body.read(max_bytes)

    def local_copy(
        self, url: str, base_urls: Iterable[str | None], cache_dir: Path, *, fetch: bool = True
    ) -> Path | None:
        """Downloaded once into `cache_dir` under its stored name: a finished upload never
        changes, so the copy stays valid for as long as the upload lives."""
        name = self.own_name(url, base_urls)
        if name is None:
            return None
        target = Path(cache_dir) / name
        if target.is_file():
            # Recency is the access time (the LoRA cache's eviction order); the modification
            # time stays the copy's, which the runtime's in-memory LoRA cache keys on.
            with contextlib.suppress(OSError):
                os.utime(target, ns=(time.time_ns(), target.stat().st_mtime_ns))
            return target
        if not fetch:
            return None
        partial = target.with_name(f".{name}.{secrets.token_hex(4)}.partial")
        try:
            with self._open_live(name, url) as body, open(partial, "wb") as out:
                for chunk in iter(lambda: body.read(1024 * 1024), b""):
                    out.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    @contextlib.contextmanager
    def _open_live(self, name: str, url: str, byte_range: str | None = None) -> Iterator[Any]:
        extra = {"Range": byte_range} if byte_range else {}
        try:
            answer = self._call("get_object", Key=self._key(name), **extra)
        except FileNotFoundError:
            raise FileNotFoundError(f"{url} was not found on this server or has expired") from None
        body = answer["Body"]
        try:
            expires_at = _expiry_of(answer)
            if expires_at is not None and expires_at <= time.time():
                raise FileNotFoundError(f"{url} was not found on this server or has expired")
            yield body
        except OSError:
            raise
        except Exception as exc:  # the connection broke while reading the body
            raise translate(exc, f"reading {name}") from exc
        finally:
            body.close()

    # --- uploads ------------------------------------------------------------------------
    def temp_path(self) -> Path:
        """A local file to receive a body in before it is sent to the bucket."""
        return self.spool_dir / secrets.token_urlsafe(24)

    def reserve(
        self,
        content_type: str | None,
        original_name: str | None,
        lifetime: float,
        now: float | None = None,
        *,
        multipart: bool = False,
    ) -> Reservation:
        reservation = new_reservation(content_type, original_name, lifetime, now)
        if multipart:
            started = self._call(
                "create_multipart_upload", Key=self._key(reservation.file_name), **_object_fields(reservation)
            )
            reservation = replace(reservation, multipart_id=started["UploadId"])
        body = json.dumps(asdict(reservation)).encode()
        self._call("put_object", Key=self._reservation_key(reservation.upload_id), Body=body)
        return reservation

    def reservation(self, upload_id: str, file_name: str, now: float | None = None) -> Reservation | None:
        if not UPLOAD_ID.fullmatch(upload_id) or not FILE_NAME.fullmatch(file_name):
            return None
        try:
            answer = self._call("get_object", Key=self._reservation_key(upload_id))
            reservation = Reservation(**json.loads(answer["Body"].read()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            return None
        now = time.time() if now is None else now
        if reservation.file_name != file_name or reservation.deadline <= now:
            return None
        return reservation

    def save_part(self, reservation: Reservation, part_number: int, received: Path, etag: str) -> str:
        """Send the part to the bucket's multipart upload; answers with the bucket's ETag."""
        try:
            if not 1 <= part_number <= MAX_PARTS:
                raise ValueError(f"part numbers run from 1 to {MAX_PARTS}, got {part_number}")
            if reservation.multipart_id is None:
                raise ValueError("this upload was not started as a multipart upload")
            with open(received, "rb") as body:
                answer = self._call(
                    "upload_part",
                    Key=self._key(reservation.file_name),
                    UploadId=reservation.multipart_id,
                    PartNumber=part_number,
                    Body=body,
                )
        finally:
            received.unlink(missing_ok=True)
        return str(answer["ETag"]).strip('"')

    def parts(self, reservation: Reservation) -> dict[int, tuple[int, str]]:
        if reservation.multipart_id is None:
            return {}
        found: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            page = self._call(
                "list_parts",
                Key=self._key(reservation.file_name),
                UploadId=reservation.multipart_id,
                PartNumberMarker=marker,
            )
            for part in page.get("Parts", []):
                found[int(part["PartNumber"])] = (int(part["Size"]), str(part["ETag"]).strip('"'))
            if not page.get("IsTruncated"):
                return found
            marker = int(page["NextPartNumberMarker"])

    def complete_parts(self, reservation: Reservation, part_numbers: list[int]) -> str:
        received = self.parts(reservation)
        for number in part_numbers[:-1]:
            if received[number][0] < MIN_PART_BYTES:
                raise ValueError(
                    f"Part {number} has {received[number][0]} bytes; with object storage every part "
                    f"but the last must have at least {MIN_PART_BYTES} bytes (5 MiB)"
                )
        self._mark_expiry(reservation)
        self._call(
            "complete_multipart_upload",
            Key=self._key(reservation.file_name),
            UploadId=reservation.multipart_id,
            MultipartUpload={
                "Parts": [{"PartNumber": n, "ETag": f'"{received[n][1]}"'} for n in part_numbers]
            },
        )
        self._close(reservation)
        return reservation.file_name

    def finish(self, reservation: Reservation, received: Path) -> str:
        try:
            self._publish(reservation, received)
        finally:
            received.unlink(missing_ok=True)
        self._close(reservation)
        return reservation.file_name

    def store_upload(
        self,
        received: Path,
        content_type: str | None,
        original_name: str | None,
        lifetime: float,
        now: float | None = None,
    ) -> str:
        reservation = new_reservation(content_type, original_name, lifetime, now)
        try:
            self._publish(reservation, received)
        finally:
            received.unlink(missing_ok=True)
        return reservation.file_name

    def purge_uploads(self, now: float | None = None) -> int:
        """Delete expired uploads (their markers come first in the listing), abandoned
        reservations (and their bucket multipart uploads) and stale spooled bodies."""
        now = time.time() if now is None else now
        doomed: list[str] = []
        removed = 0
        for item in self._listing(self.prefix + _EXPIRY):
            expiry, name = _parse_marker(item["Key"].removeprefix(self.prefix + _EXPIRY))
            if expiry is None or expiry > now:
                break  # markers are sorted by expiry: the rest are alive
            doomed += [self._key(name), item["Key"]]
            removed += 1
        for start in range(0, len(doomed), _DELETE_BATCH):
            objects = [{"Key": key} for key in doomed[start : start + _DELETE_BATCH]]
            self._call("delete_objects", Delete={"Objects": objects, "Quiet": True})
        for item in self._listing(self.prefix + _UPLOADS):
            if item["LastModified"].timestamp() + UPLOAD_WINDOW_SECONDS > now:
                continue  # written less than an upload window ago: cannot be past its deadline
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
                answer = self._call("get_object", Key=item["Key"])
                reservation = Reservation(**json.loads(answer["Body"].read()))
                if reservation.deadline > now:
                    continue
                if reservation.multipart_id:
                    with contextlib.suppress(FileNotFoundError):
                        self._call(
                            "abort_multipart_upload",
                            Key=self._key(reservation.file_name),
                            UploadId=reservation.multipart_id,
                        )
            self._call("delete_object", Key=item["Key"])
            removed += 1
        for path in self.spool_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < now - UPLOAD_WINDOW_SECONDS:
                    path.unlink()
        return removed

    # --- orphans ----------------------------------------------------------------------------
    def generated_images(self, stored_after: float, stored_before: float) -> dict[str, float]:
        """Generated images (top-level image objects without an expiry marker) written in the
        window, by the bucket's clock (the sweep allows for skew)."""
        uploads = {
            _parse_marker(item["Key"].removeprefix(self.prefix + _EXPIRY))[1]
            for item in self._listing(self.prefix + _EXPIRY)
        }
        found: dict[str, float] = {}
        for item in self._listing(self.prefix, top_level=True):
            name = item["Key"].removeprefix(self.prefix)
            written = item["LastModified"].timestamp()
            if (
                FILE_NAME.fullmatch(name)
                and image_content_type(name)
                and name not in uploads
                and stored_after < written <= stored_before
            ):
                found[name] = written
        return found

    # --- internals ------------------------------------------------------------------------
    def _key(self, file_name: str) -> str:
        return self.prefix + file_name

    def _reservation_key(self, upload_id: str) -> str:
        return f"{self.prefix}{_UPLOADS}{upload_id}.json"

    def _presign(self, file_name: str, seconds: int = MAX_PRESIGN_SECONDS) -> str:
        params = {"Bucket": self.bucket, "Key": self._key(file_name)}
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=seconds)

    def _mark_expiry(self, reservation: Reservation) -> None:
        # Before the object: a crash in between leaves a marker without an object (purged at
        # its time), never an object that no purge would find.
        marker = f"{math.ceil(reservation.expires_at):0{_EXPIRY_DIGITS}d}-{reservation.file_name}"
        self._call("put_object", Key=self.prefix + _EXPIRY + marker, Body=b"")

    def _publish(self, reservation: Reservation, received: Path) -> None:
        self._mark_expiry(reservation)
        with open(received, "rb") as body:
            self._call(
                "put_object", Key=self._key(reservation.file_name), Body=body, **_object_fields(reservation)
            )

    def _close(self, reservation: Reservation) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("delete_object", Key=self._reservation_key(reservation.upload_id))

    def _listing(self, prefix: str, *, top_level: bool = False) -> Iterator[dict]:
        """Objects under `prefix` in key order, page by page (only the first level: `top_level`)."""
        params: dict[str, Any] = {"Prefix": prefix}
        if top_level:
            params["Delimiter"] = "/"
        while True:
            page = self._call("list_objects_v2", **params)
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            params["ContinuationToken"] = page["NextContinuationToken"]

    def _call(self, operation: str, **params: Any) -> Any:
        method: Callable[..., Any] = getattr(self.client, operation)
        try:
            return method(Bucket=self.bucket, **params)
        except Exception as exc:
            raise translate(exc, operation) from exc


def _object_fields(reservation: Reservation) -> dict[str, Any]:
    metadata = {"expires-at": f"{reservation.expires_at:.3f}"}
    if reservation.original_name:
        metadata["original-name"] = quote(reservation.original_name)  # metadata is ASCII
    return {"ContentType": reservation.content_type, "Metadata": metadata}


def _expiry_of(answer: dict) -> float | None:
    raw = (answer.get("Metadata") or {}).get("expires-at")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _parse_marker(marker: str) -> tuple[float | None, str]:
    digits, _, name = marker.partition("-")
    return (float(digits) if digits.isdigit() else None), name
