"""`GET /files/{name}`: generated images, at stable unguessable URLs, cacheable for the retention.

Names are random tokens chosen by the storage; anything that is not a plain file name of that
shape is a 404 before the file system is touched, so no path can escape the files directory.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse

from server.deps import get_settings, get_storage
from server.jobs import CONTENT_TYPES

router = APIRouter(tags=["files"])

NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}\.(jpeg|jpg|png|webp)$")
EXTENSION_TYPES = {**CONTENT_TYPES, "jpg": "image/jpeg"}


@router.head("/files/{name}", include_in_schema=False)
@router.get("/files/{name}", operation_id="get_file", summary="A generated image")
async def get_file(name: str, request: Request) -> Response:
    match = NAME.match(name)
    if match is None:
        raise HTTPException(status_code=404, detail="File not found")
    try:
        path = get_storage(request).path(name)
    except (ValueError, OSError):
        raise HTTPException(status_code=404, detail="File not found") from None
    if path is None or not path.is_file():
        raise HTTPException(status_code=404, detail="File not found")
    max_age = int(get_settings(request).retention_seconds)
    response = FileResponse(
        path,
        stat_result=path.stat(),  # sets the ETag now, so that If-None-Match can be answered
        media_type=EXTENSION_TYPES[match.group(1)],
        headers={"cache-control": f"public, max-age={max_age}, immutable"},
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
