"""`GET /files/{name}`: generated images and uploads, at stable unguessable URLs, cacheable
for as long as they live.

With auth on, a file is served only at a signed URL (`/files/<exp>.<sig>/<name>`, the form of
every URL the server returns; server/storage/signing.py), checked before anything else: a
missing, altered or expired signature is a 403. Names are random tokens chosen by the storage; anything
that is not a plain file name of that shape is a 404 before the file system is touched, so no
path can escape the files directory.
An upload is served with the content type its client declared, under a sandboxing policy so
that an uploaded page cannot run scripts on this server's origin. With object storage
(`--storage-url`) the answer is a redirect to the object's presigned (or public) URL.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from server.api.deps import get_settings, get_storage
from server.storage import StorageUnavailable

router = APIRouter(tags=["files"])

SAFETY_HEADERS = {"x-content-type-options": "nosniff", "content-security-policy": "sandbox"}


@router.head("/files/{name}", include_in_schema=False)
@router.get("/files/{name}", operation_id="get_file", summary="A generated image or an upload")
async def get_file(name: str, request: Request) -> Response:
    return await serve_file(name, None, request)


@router.head("/files/{signature}/{name}", include_in_schema=False)
@router.get("/files/{signature}/{name}", operation_id="get_signed_file", summary="A file, at its signed URL")
async def get_signed_file(signature: str, name: str, request: Request) -> Response:
    return await serve_file(name, signature, request)


async def serve_file(name: str, signature: str | None, request: Request) -> Response:
    signer = request.app.state.url_signer
    if signer.active:  # auth on: the URL's signature is the permission (no API key needed)
        problem = signer.verify(name, signature)
        if problem is not None:
            raise HTTPException(status_code=403, detail=problem)
    try:
        info = await asyncio.to_thread(get_storage(request).file_info, name)
    except StorageUnavailable:
        raise  # a bucket down for now: 503, not a 404 that says the file is gone
    except (ValueError, OSError):
        info = None
    if info is None:
        raise HTTPException(status_code=404, detail="File not found")
    if info.url is not None:  # in object storage: read from the bucket, not through the API
        # Not cached: the presigned URL it points to expires.
        return RedirectResponse(info.url, status_code=307, headers={"cache-control": "no-store"})
    path = info.path
    if path is None:  # a bucket URL that cannot be presigned (see S3Storage.read_url)
        raise HTTPException(status_code=404, detail="File not found")
    max_age = int(get_settings(request).retention_seconds)
    if info.expires_at is not None:
        max_age = max(0, int(info.expires_at - time.time()))
    response = FileResponse(
        path,
        stat_result=path.stat(),  # sets the ETag now, so that If-None-Match can be answered
        media_type=info.content_type,
        headers={"cache-control": f"public, max-age={max_age}, immutable", **SAFETY_HEADERS},
    )
    etag = response.headers["etag"]
    if etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
        return Response(
            status_code=304, headers={"etag": etag, "cache-control": response.headers["cache-control"]}
        )
    return response


@router.api_route("/files/{rest:path}", methods=["GET", "HEAD"], include_in_schema=False)
async def not_a_file(rest: str) -> Response:
    # Nested or encoded paths (`/files/..%2Fx`) would otherwise fall through to fal's
    # `/{owner}/{app}/...` patterns; under /files nothing but a stored name exists.
    raise HTTPException(status_code=404, detail="File not found")
