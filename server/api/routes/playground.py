"""`GET /`: the playground, one page with its assets under server/api/static/playground/.

The page builds a form for each fal endpoint from `/openapi.json` (so endpoints added to fal's
app table appear by themselves), submits through fal's queue API and follows the status
stream. It reaches nothing but this server; the API key and the history stay in the browser.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

PAGE = Path(__file__).resolve().parents[1] / "static" / "playground" / "index.html"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(PAGE, media_type="text/html", headers={"cache-control": "no-cache"})
