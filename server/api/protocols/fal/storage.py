"""fal's storage protocol, so unmodified clients upload their files to this server.

    POST /storage/auth/token                     a token for the upload host (fal_client)
    POST /files/upload                           the bytes in one request (fal_client)
    POST /files/upload/multipart                 start a multipart upload (fal_client > 100 MB)
    POST /storage/upload/initiate                start an upload; bytes follow by PUT (JS client,
                                                 fal_client's fallback)
    POST /storage/upload/initiate-multipart      the same in parts (JS client > 90 MB)
    PUT  /files/{name}/upload/{upload_id}        the bytes of an initiated upload
    PUT  /files/{name}/multipart/{upload_id}/{n} part n of a multipart upload
    POST /files/{name}/multipart/{upload_id}/complete
    (the last two also under a signed file URL, /files/<exp>.<sig>/{name}/...)

The routes that start an upload, and the one-request upload, are behind the API keys. The PUT
and complete routes are authorised by their upload id instead: the JS client sends those
requests straight to the returned `upload_url`, without credentials or the proxy, so the URL
itself is the permission (unguessable, valid for an hour, for one file). The token handed out
is the caller's own API key: it only ever goes back to this server, whose routes accept it
like any key. Finished files are served by the files route at the returned URL, for the
retention time or the lifetime the client's lifecycle header asks for (up to a maximum).

A full disk is 507 on every route here (server/api/errors.py renders it): below the free-space
floor (--min-free-disk-bytes) nothing is started or received, and a write that fails for want
of space (the body, a part, a reservation) keeps nothing of the upload.

With object storage (`--storage-url`) the bytes still arrive here (the size limit and the
lifetime are this server's), and go on to the bucket: a body is spooled to a local file and
sent, a multipart upload's parts become the bucket's multipart upload's parts. The returned
file URL is then the object's presigned (or public) URL, valid as long as the upload lives;
fal_client's multipart `access_url` alone stays this server's (the client PUTs the parts
under it), and that URL redirects to the bucket. A bucket that cannot be reached answers 503
(the clients retry); nothing of the upload is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from server.api.auth import presented_key
from server.api.deps import get_free_space, get_settings, get_storage, public_base_url
from server.api.protocols.fal.lifecycle import lifecycle_seconds
from server.api.protocols.fal.queue_routes import require_fal_key
from server.api.protocols.fal.storage_models import (
    CompleteMultipartInput,
    InitiateUploadInput,
    InitiateUploadOutput,
    MultipartStarted,
    StorageToken,
    UploadedPart,
    UploadOutput,
)
from server.config import Settings
from server.disk import DiskFull, is_disk_full
from server.storage import MAX_PARTS, Reservation, file_url, multipart_url, upload_url


class StorageRoute(APIRoute):
    """An upload that fails for want of space (ENOSPC, EDQUOT while writing the body, a part or
    the reservation) raises DiskFull, answered 507 instead of 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def storage_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except OSError as exc:
                if is_disk_full(exc):
                    raise DiskFull() from exc
                raise

        return storage_handler


def refuse_when_disk_full(request: Request) -> None:
    """Below the free-space floor no upload starts or receives bytes (a plain function:
    FastAPI runs it in a thread, off the loop, when the cached measurement is refreshed)."""
    get_free_space(request).check()


router = APIRouter(
    tags=["fal storage"], route_class=StorageRoute, dependencies=[Depends(refuse_when_disk_full)]
)
authorized = [Depends(require_fal_key)]

TOKEN_SECONDS = 3600
# Bytes gathered from the request before one write to disk (in a thread, off the loop).
WRITE_CHUNK = 1024 * 1024


# --- starting uploads (API keys) ---------------------------------------------------------------


@router.post("/storage/auth/token", dependencies=authorized, response_model=StorageToken)
async def storage_token(request: Request) -> JSONResponse:
    expires = datetime.fromtimestamp(time.time() + TOKEN_SECONDS, tz=timezone.utc)
    token = StorageToken(
        token=presented_key(request) or secrets.token_urlsafe(24),  # auth off: any token will do
        token_type="Key",
        base_url=public_base_url(request),
        expires_at=expires.isoformat(),
    )
    return JSONResponse(token.model_dump())


@router.post("/files/upload", dependencies=authorized, response_model=UploadOutput)
async def upload_in_one_request(request: Request) -> JSONResponse:
    settings = get_settings(request)
    storage = get_storage(request)
    lifetime = upload_lifetime(request, settings)
    received = storage.temp_path()
    await receive_body(request, received, settings.max_upload_bytes)
    name = await asyncio.to_thread(
        storage.store_upload,
        received,
        request.headers.get("content-type"),
        request.headers.get("x-fal-file-name"),
        lifetime,
    )
    access_url = readable_url(request, name, time.time() + lifetime)
    return JSONResponse(UploadOutput(access_url=access_url).model_dump())


@router.post("/files/upload/multipart", dependencies=authorized, response_model=MultipartStarted)
async def start_multipart_upload(request: Request) -> JSONResponse:
    reservation = await reserve(
        request, request.headers.get("content-type"), request.headers.get("x-fal-file-name"), multipart=True
    )
    # This server's URL, never the bucket's: fal_client PUTs the parts under it (the routes
    # below take the signed form too) and returns it as the finished file's URL.
    started = MultipartStarted(
        access_url=file_url(public_base_url(request), reservation.file_name, reservation.expires_at),
        uploadId=reservation.upload_id,
    )
    return JSONResponse(started.model_dump())


@router.post("/storage/upload/initiate", dependencies=authorized, response_model=InitiateUploadOutput)
async def initiate_upload(body: InitiateUploadInput, request: Request) -> JSONResponse:
    reservation = await reserve(request, body.content_type, body.file_name)
    return initiated(request, reservation, upload_url)


@router.post(
    "/storage/upload/initiate-multipart", dependencies=authorized, response_model=InitiateUploadOutput
)
async def initiate_multipart_upload(body: InitiateUploadInput, request: Request) -> JSONResponse:
    reservation = await reserve(request, body.content_type, body.file_name, multipart=True)
    return initiated(request, reservation, multipart_url)


def initiated(
    request: Request, reservation: Reservation, url_for: Callable[[str, Reservation], str]
) -> JSONResponse:
    base_url = public_base_url(request)
    output = InitiateUploadOutput(
        upload_url=url_for(base_url, reservation),
        file_url=readable_url(request, reservation.file_name, reservation.expires_at),
    )
    return JSONResponse(output.model_dump())


# --- sending the bytes (authorised by the upload id) --------------------------------------------


@router.put("/files/{name}/upload/{upload_id}", response_model=UploadOutput)
async def put_upload(name: str, upload_id: str, request: Request) -> JSONResponse:
    storage = get_storage(request)
    reservation = await open_reservation(request, name, upload_id)
    received = storage.temp_path()
    await receive_body(request, received, get_settings(request).max_upload_bytes)
    await asyncio.to_thread(storage.finish, reservation, received)
    access_url = readable_url(request, name, reservation.expires_at)
    return JSONResponse(UploadOutput(access_url=access_url).model_dump())


@router.put("/files/{name}/multipart/{upload_id}/{part_number}", response_model=UploadedPart)
async def put_part(name: str, upload_id: str, part_number: int, request: Request) -> JSONResponse:
    storage = get_storage(request)
    reservation = await open_reservation(request, name, upload_id)
    if not 1 <= part_number <= MAX_PARTS:
        raise HTTPException(status_code=400, detail=f"Part numbers run from 1 to {MAX_PARTS}")
    parts = await asyncio.to_thread(storage.parts, reservation)
    so_far = sum(size for number, (size, _) in parts.items() if number != part_number)
    limit = get_settings(request).max_upload_bytes
    received = storage.temp_path()
    etag = await receive_body(request, received, limit - so_far, total_limit=limit)
    try:
        etag = await asyncio.to_thread(storage.save_part, reservation, part_number, received, etag)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    part = UploadedPart(partNumber=part_number, etag=etag)
    return JSONResponse(part.model_dump(), headers={"etag": etag})


@router.post("/files/{name}/multipart/{upload_id}/complete", response_model=UploadOutput)
async def complete_multipart(name: str, upload_id: str, request: Request) -> JSONResponse:
    storage = get_storage(request)
    reservation = await open_reservation(request, name, upload_id)
    try:
        body = CompleteMultipartInput.model_validate_json(await request.body())
    except ValueError as exc:
        raise RequestValidationError([{"loc": ["body"], "msg": str(exc), "type": "value_error"}]) from None
    received = await asyncio.to_thread(storage.parts, reservation)
    problem = parts_problem(body, received, get_settings(request).max_upload_bytes)
    if problem is not None:
        raise problem
    numbers = sorted(part.partNumber for part in body.parts)
    try:
        await asyncio.to_thread(storage.complete_parts, reservation, numbers)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    access_url = readable_url(request, name, reservation.expires_at)
    return JSONResponse(UploadOutput(access_url=access_url).model_dump())


# fal_client sends a multipart upload's parts and its completion under the access URL it was
# given, which is signed while auth is on (`/files/<exp>.<sig>/<name>`): the same routes. The
# upload id is the permission here, as above.
@router.put(
    "/files/{signature}/{name}/multipart/{upload_id}/{part_number}",
    response_model=UploadedPart,
    include_in_schema=False,
)
async def put_part_signed(
    signature: str, name: str, upload_id: str, part_number: int, request: Request
) -> JSONResponse:
    return await put_part(name, upload_id, part_number, request)


@router.post(
    "/files/{signature}/{name}/multipart/{upload_id}/complete",
    response_model=UploadOutput,
    include_in_schema=False,
)
async def complete_multipart_signed(
    signature: str, name: str, upload_id: str, request: Request
) -> JSONResponse:
    return await complete_multipart(name, upload_id, request)


# --- helpers ----------------------------------------------------------------------------------


async def reserve(
    request: Request, content_type: str | None, file_name: str | None, *, multipart: bool = False
) -> Reservation:
    lifetime = upload_lifetime(request, get_settings(request))
    storage = get_storage(request)
    return await asyncio.to_thread(
        partial(storage.reserve, content_type, file_name, lifetime, multipart=multipart)
    )


async def open_reservation(request: Request, name: str, upload_id: str) -> Reservation:
    reservation = await asyncio.to_thread(get_storage(request).reservation, upload_id, name)
    if reservation is None:
        raise HTTPException(status_code=404, detail="Upload not found, finished or expired")
    return reservation


def readable_url(request: Request, name: str, expires_at: float) -> str:
    """Where the client reads an upload: the bucket's URL for it when the store has one (valid
    until the upload expires), else this server's files route."""
    url = get_storage(request).read_url(name, expires_at - time.time())
    return url or file_url(public_base_url(request), name, expires_at)


def upload_lifetime(request: Request, settings: Settings) -> float:
    """Seconds the uploaded file lives: the client's lifecycle preference up to the server's
    maximum, else the retention time."""
    seconds = lifecycle_seconds(request)
    if seconds is None:
        return min(settings.retention_seconds, settings.max_upload_retention_seconds)
    return min(seconds, settings.max_upload_retention_seconds)


def too_large(limit: int) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=f"The upload is larger than this server's limit of {limit} bytes (--max-upload-bytes)",
    )


async def receive_body(
    request: Request, target: Path, max_bytes: int, *, total_limit: int | None = None
) -> str:
    """Stream the request body into `target` (writes off the loop); returns its MD5 hex, the
    part's ETag. Over `max_bytes`: 413 and nothing is kept."""
    limit_named = total_limit if total_limit is not None else max_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(limit_named)
    digest = hashlib.md5(usedforsecurity=False)
    handle = await asyncio.to_thread(open, target, "wb")
    size = 0
    pending = bytearray()
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large(limit_named)
            pending += chunk
            if len(pending) >= WRITE_CHUNK:
                await asyncio.to_thread(write_chunk, handle, digest, bytes(pending))
                pending.clear()
        if pending:
            await asyncio.to_thread(write_chunk, handle, digest, bytes(pending))
    except ClientDisconnect:
        await asyncio.to_thread(discard, handle, target)
        raise HTTPException(status_code=400, detail="The client left before the upload finished") from None
    except BaseException:
        await asyncio.to_thread(discard, handle, target)
        raise
    await asyncio.to_thread(handle.close)
    return digest.hexdigest()


def write_chunk(handle: BinaryIO, digest: Any, data: bytes) -> None:
    handle.write(data)
    digest.update(data)


def discard(handle: BinaryIO, target: Path) -> None:
    handle.close()
    target.unlink(missing_ok=True)


def parts_problem(
    body: CompleteMultipartInput, received: dict[int, tuple[int, str]], limit: int
) -> HTTPException | None:
    """Why the parts listed by `complete` cannot be assembled, or None."""
    numbers = sorted(part.partNumber for part in body.parts)
    if numbers != list(range(1, len(numbers) + 1)):
        return HTTPException(status_code=400, detail="Parts must be numbered 1..n without gaps or repeats")
    for part in body.parts:
        if part.partNumber not in received:
            return HTTPException(status_code=400, detail=f"Part {part.partNumber} was not received")
        if part.etag.strip('"') != received[part.partNumber][1]:
            return HTTPException(
                status_code=400, detail=f"Part {part.partNumber}: the etag is not the one this server sent"
            )
    # Parts sent at the same time are each checked against the total received before them.
    if sum(received[number][0] for number in numbers) > limit:
        return too_large(limit)
    return None
