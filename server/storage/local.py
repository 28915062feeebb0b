"""Files on the local disk (generated images and client uploads), the default store.

Only names this package could have produced are ever served (server/storage/base.py):
`path()` refuses anything with a separator, a leading dot, a traversal, or a symlink, so a
URL cannot reach outside the folder.

Layout of the files folder (a shared mount works: nothing here is per process):

    <name>                      a generated image or a finished upload, served at /files/<name>
    .meta/<name>.json           an upload's content type, original name and expiry time
    .uploads/<upload id>.json   an upload that was started and not finished (a reservation)
    .parts/<upload id>/<n>      the parts of a multipart upload received so far
    .tmp/                       bodies being received

A generated image has no metadata: its request's retention deletes it. An upload lives until
its own expiry time, which `purge_uploads` enforces (and `file_info` checks when serving).

A write that fails (a full disk above all) leaves nothing behind: the received bytes and any
partial file are removed at once, not when a purge comes by, since space is what is short.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

from server.storage.base import (
    FILE_NAME,
    IMAGE_TYPES,
    MAX_PARTS,
    UPLOAD_ID,
    UPLOAD_WINDOW_SECONDS,
    Reservation,
    StoredFile,
    file_name_from_url,
    new_name,
    new_reservation,
    normalize_content_type,
)


class LocalStorage:
    def __init__(self, files_dir: Path) -> None:
        self.files_dir = Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)

    # --- generated images ---------------------------------------------------------------
    def save(self, data: bytes, extension: str) -> str:
        """Write `data` under a fresh unguessable name; the file appears complete or not at all."""
        name = new_name(extension)
        partial = self.files_dir / f".{name}.partial"
        with _removed_on_failure(partial), open(partial, "wb") as handle:
            handle.write(data)
        os.replace(partial, self.files_dir / name)
        return name

    def read_url(self, file_name: str, lifetime: float) -> str | None:
        return None  # served by this server's files route, on the base URL of each request

    def path(self, file_name: str) -> Path | None:
        """The file for a name we could have made, or None (bad name, missing, not a plain file)."""
        if not FILE_NAME.fullmatch(file_name):
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
        if FILE_NAME.fullmatch(file_name):
            with contextlib.suppress(FileNotFoundError):
                self._meta_path(file_name).unlink()

    def file_info(self, file_name: str, now: float | None = None) -> StoredFile | None:
        """A servable file and its content type, or None (unknown, unfinished or expired)."""
        path = self.path(file_name)
        if path is None:
            return None
        meta = _read_json(self._meta_path(file_name))
        if meta is None:
            kind = IMAGE_TYPES.get(path.suffix)
            return StoredFile(path, kind, None) if kind else None
        expires_at = float(meta.get("expires_at", 0))
        if expires_at <= (time.time() if now is None else now):
            return None
        return StoredFile(path, normalize_content_type(meta.get("content_type")), expires_at)

    def own_file(self, url: str, base_urls: Iterable[str | None]) -> Path | None:
        """The local file behind `url` if it is one of this server's file URLs, else None.

        Raises FileNotFoundError for a URL of ours whose file is gone (expired, deleted), so
        that the caller reports that instead of fetching our own 404 over HTTP."""
        name = file_name_from_url(url, base_urls)
        if name is None:
            return None
        info = self.file_info(name)
        if info is None:
            raise FileNotFoundError(f"{url} was not found on this server or has expired")
        return info.path

    def read_own(self, url: str, base_urls: Iterable[str | None], max_bytes: int) -> bytes | None:
        path = self.own_file(url, base_urls)
        if path is None:
            return None
        with open(path, "rb") as handle:
            return handle.read(max_bytes)

    def local_copy(
        self, url: str, base_urls: Iterable[str | None], cache_dir: Path, *, fetch: bool = True
    ) -> Path | None:
        return self.own_file(url, base_urls)  # already on this machine: no copy

    # --- uploads ------------------------------------------------------------------------
    def temp_path(self) -> Path:
        """A fresh path for receiving a body; `store_upload` or `finish` moves it into place."""
        folder = self._folder(".tmp")
        return folder / secrets.token_urlsafe(24)

    def reserve(
        self,
        content_type: str | None,
        original_name: str | None,
        lifetime: float,
        now: float | None = None,
        *,
        multipart: bool = False,  # the same on a disk: parts are kept as files either way
    ) -> Reservation:
        """Start an upload whose bytes arrive later (a PUT, or the parts of a multipart upload)."""
        reservation = new_reservation(content_type, original_name, lifetime, now)
        _write_json(self._folder(".uploads") / f"{reservation.upload_id}.json", asdict(reservation))
        return reservation

    def reservation(self, upload_id: str, file_name: str, now: float | None = None) -> Reservation | None:
        """The open upload `upload_id` for the file `file_name`, or None (unknown or too late)."""
        if not UPLOAD_ID.fullmatch(upload_id) or not FILE_NAME.fullmatch(file_name):
            return None
        data = _read_json(self.files_dir / ".uploads" / f"{upload_id}.json")
        if data is None:
            return None
        try:
            reservation = Reservation(**data)
        except TypeError:
            return None
        now = time.time() if now is None else now
        if reservation.file_name != file_name or reservation.deadline <= now:
            return None
        return reservation

    def save_part(self, reservation: Reservation, part_number: int, received: Path, etag: str) -> str:
        """Keep part `part_number` (sent again: replaced) and the ETag it is answered with."""
        if not 1 <= part_number <= MAX_PARTS:
            raise ValueError(f"part numbers run from 1 to {MAX_PARTS}, got {part_number}")
        with _removed_on_failure(received):
            folder = self._folder(".parts") / reservation.upload_id
            folder.mkdir(exist_ok=True)
            (folder / f"{part_number}.etag").write_text(etag)
            os.replace(received, folder / str(part_number))
        return etag

    def parts(self, reservation: Reservation) -> dict[int, tuple[int, str]]:
        """The parts received so far: number -> (size, ETag)."""
        folder = self.files_dir / ".parts" / reservation.upload_id
        found: dict[int, tuple[int, str]] = {}
        for path in _listing(folder):
            if path.name.isdigit():
                with contextlib.suppress(FileNotFoundError):
                    etag = (folder / f"{path.name}.etag").read_text()
                    found[int(path.name)] = (path.stat().st_size, etag)
        return found

    def complete_parts(self, reservation: Reservation, part_numbers: list[int]) -> str:
        """Join the parts in this order into the reserved file; returns its name."""
        return self.finish(reservation, self.assemble(reservation, part_numbers))

    def assemble(self, reservation: Reservation, part_numbers: list[int]) -> Path:
        """Concatenate the parts in this order into one temporary file (a missing part raises
        FileNotFoundError) and remove the parts."""
        target = self.temp_path()
        folder = self.files_dir / ".parts" / reservation.upload_id
        with _removed_on_failure(target), open(target, "wb") as out:
            for number in part_numbers:
                with open(folder / str(number), "rb") as part:
                    shutil.copyfileobj(part, out, 1024 * 1024)
        shutil.rmtree(folder, ignore_errors=True)
        return target

    def finish(self, reservation: Reservation, received: Path) -> str:
        """Move the received bytes into place as the reserved file; closes the reservation."""
        with _removed_on_failure(received):
            self._publish(received, reservation.file_name, reservation)
        with contextlib.suppress(FileNotFoundError):
            (self.files_dir / ".uploads" / f"{reservation.upload_id}.json").unlink()
        return reservation.file_name

    def store_upload(
        self,
        received: Path,
        content_type: str | None,
        original_name: str | None,
        lifetime: float,
        now: float | None = None,
    ) -> str:
        """Move a body received in one request into place as a new upload; returns its name."""
        with _removed_on_failure(received):
            reservation = self.reserve(content_type, original_name, lifetime, now)
        return self.finish(reservation, received)

    def purge_uploads(self, now: float | None = None) -> int:
        """Delete expired uploads, abandoned reservations, their parts and stale bodies;
        returns how many uploads (finished or not) were removed."""
        now = time.time() if now is None else now
        removed = 0
        for meta_path in _listing(self.files_dir / ".meta"):
            meta = _read_json(meta_path)
            if meta is None or float(meta.get("expires_at", 0)) <= now:
                self.delete(meta_path.name.removesuffix(".json"))
                removed += 1
        for path in _listing(self.files_dir / ".uploads"):
            data = _read_json(path)
            if data is None or float(data.get("deadline", 0)) <= now:
                shutil.rmtree(self.files_dir / ".parts" / path.stem, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed += 1
        for path in _listing(self.files_dir / ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < now - UPLOAD_WINDOW_SECONDS:
                    path.unlink()
        return removed

    # --- orphans ----------------------------------------------------------------------------
    def generated_images(self, stored_after: float, stored_before: float) -> dict[str, float]:
        """Generated images (image files without upload metadata) last written in the window
        (`stored_after`, `stored_before`], by name, with that time (unix). Also deletes what
        an interrupted `save` left (`.<name>.partial`) written before `stored_before`."""
        uploads = {path.name.removesuffix(".json") for path in _listing(self.files_dir / ".meta")}
        found: dict[str, float] = {}
        with os.scandir(self.files_dir) as entries:
            for entry in entries:
                name = entry.name
                is_partial = name.startswith(".") and name.endswith(".partial")
                is_image = bool(FILE_NAME.fullmatch(name)) and Path(name).suffix in IMAGE_TYPES
                if not (is_partial or is_image) or name in uploads:
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    written = entry.stat(follow_symlinks=False).st_mtime
                    if is_partial and written <= stored_before:
                        os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                if is_image and stored_after < written <= stored_before:
                    found[name] = written
        return found

    # --- internals ------------------------------------------------------------------------
    def _publish(self, received: Path, file_name: str, reservation: Reservation) -> None:
        # Metadata first: a crash in between leaves metadata without a file (never served,
        # purged at its expiry), never a file served with the wrong type or no expiry.
        meta = {
            "content_type": reservation.content_type,
            "original_name": reservation.original_name,
            "expires_at": reservation.expires_at,
        }
        _write_json(self._new_meta_path(file_name), meta)
        os.replace(received, self.files_dir / file_name)

    def _meta_path(self, file_name: str) -> Path:
        return self.files_dir / ".meta" / f"{file_name}.json"

    def _new_meta_path(self, file_name: str) -> Path:
        return self._folder(".meta") / f"{file_name}.json"

    def _folder(self, name: str) -> Path:
        folder = self.files_dir / name
        folder.mkdir(exist_ok=True)
        return folder


@contextlib.contextmanager
def _removed_on_failure(path: Path) -> Iterator[None]:
    """Delete `path` if the block fails (a full disk): nothing half-written stays behind."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    with _removed_on_failure(partial):
        partial.write_text(json.dumps(data))
    os.replace(partial, path)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _listing(folder: Path) -> list[Path]:
    try:
        return [path for path in folder.iterdir() if not path.name.startswith(".")]
    except FileNotFoundError:
        return []
