"""`GET /metrics`: Prometheus text format (see server/metrics.py for the figures).

Behind the API keys when auth is on; a separate `--metrics-key` replaces them here, so that a
Prometheus server can scrape without holding a key that also generates images.
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, HTTPException, Request, Response

from server import metrics
from server.api.auth import check_api_key, presented_key
from server.api.deps import get_settings

router = APIRouter(tags=["operations"])


def require_metrics_access(request: Request) -> None:
    metrics_key = get_settings(request).metrics_key
    if metrics_key is None:
        allowed = check_api_key(request)
    else:
        key = presented_key(request) or ""
        allowed = hmac.compare_digest(key.encode(), metrics_key.encode())
    if not allowed:
        raise HTTPException(status_code=401, detail="Send the metrics key (or an API key) to read /metrics")


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}, 401: {"description": "Missing or wrong key"}},
)
async def get_metrics(request: Request) -> Response:
    require_metrics_access(request)
    body = await asyncio.to_thread(metrics.render, request.app.state.queue)
    return Response(body, media_type=metrics.CONTENT_TYPE)
