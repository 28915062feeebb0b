"""`GET /admin/usage`: what each tenant used, per endpoint (app id) and UTC day, for billing
and capacity planning; admin keys only.

`from` and `to` are UTC days (YYYY-MM-DD, both included; either may be left out), `format`
`json` (default) or `csv`. The figures come from the queue's usage table (server/queue/
usage.py), which outlives the retention purge of the jobs themselves. Both formats carry the
same rows: requests (failed ones included), failed, images, pixels (exact) and megapixels,
GPU seconds.
"""

from __future__ import annotations

import csv
import io
from datetime import date
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse

from server.api.auth import KeyProblem, api_key_dependency, caller_of
from server.api.deps import get_queue
from server.queue.usage import UsageRow, tenant_label

COLUMNS = ("day", "tenant", "endpoint", "requests", "failed", "images", "pixels", "megapixels", "gpu_seconds")


def _refuse(problem: KeyProblem) -> HTTPException:
    return HTTPException(status_code=401, detail="Send an admin API key to read usage")


router = APIRouter(tags=["operations"], dependencies=[Depends(api_key_dependency(_refuse))])


def _day(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise HTTPException(status_code=422, detail=f"'{name}' must be a UTC day, YYYY-MM-DD") from None


def as_dict(row: UsageRow) -> dict[str, Any]:
    return {
        "day": row.day,
        "tenant": tenant_label(row.tenant),
        "endpoint": row.app_id,
        "requests": row.requests,
        "failed": row.failed,
        "images": row.images,
        "pixels": row.pixels,
        "megapixels": row.megapixels,
        "gpu_seconds": row.gpu_seconds,
    }


def as_csv(rows: list[UsageRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(as_dict(row))
    return out.getvalue()


@router.get(
    "/admin/usage",
    operation_id="admin_usage",
    summary="Usage per tenant, endpoint and UTC day (admin keys only)",
    responses={401: {"description": "Missing or wrong key"}, 403: {"description": "Not an admin key"}},
)
async def usage(
    request: Request,
    first: str | None = Query(None, alias="from", description="First UTC day, YYYY-MM-DD"),
    last: str | None = Query(None, alias="to", description="Last UTC day, YYYY-MM-DD (included)"),
    format: Literal["json", "csv"] = Query("json"),
) -> Response:
    if not caller_of(request).is_admin:
        raise HTTPException(status_code=403, detail="Usage is for admin keys only")
    first_day, last_day = _day(first, "from"), _day(last, "to")
    if first_day and last_day and first_day > last_day:
        raise HTTPException(status_code=422, detail="'from' is after 'to'")
    rows = await get_queue(request).usage(first_day, last_day)
    if format == "csv":
        return Response(as_csv(rows), media_type="text/csv; charset=utf-8")
    return JSONResponse({"from": first_day, "to": last_day, "rows": [as_dict(row) for row in rows]})
