"""`GET /metrics`: Prometheus text format (see server/metrics.py for the figures).

Behind the keys when auth is on: named keys of role `metrics`, and admin keys unless a
`--metrics-key` is set, which then replaces them, so that a Prometheus server can scrape
without holding a key that also generates images. User keys are refused: the figures cover
every tenant.
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, HTTPException, Request, Response

from server import metrics
from server.api.auth import presented_key, resolve_caller
from server.api.deps import get_settings
from server.tenants import Role

router = APIRouter(tags=["operations"])


def require_metrics_access(request: Request) -> None:
    """The `--metrics-key`, a named key of role metrics, or (without a metrics key) an admin
    key, or anything when auth is off. A user key is refused: the figures cover every tenant."""
    metrics_key = get_settings(request).metrics_key
    key = presented_key(request) or ""
    allowed = metrics_key is not None and hmac.compare_digest(key.encode(), metrics_key.encode())
    if not allowed:
        caller = resolve_caller(request)
        allowed = caller is not None and (
            caller.role is Role.METRICS or (caller.is_admin and metrics_key is None)
        )
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
