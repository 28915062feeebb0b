"""`GET /health`: 200 only when every expected worker has its model loaded and warmed.

Load balancers and `flux-server serve` use it; the body says why the server is not ready.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.deps import get_queue, get_settings

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    queue = get_queue(request)
    settings = get_settings(request)
    workers = await queue.workers()
    not_ready = [w for w in workers if w.state != "ready"]
    # `serve` tells its API how many workers it started; a standalone API waits for one.
    expected = settings.workers or 1
    if not workers:
        reason = "no worker has registered yet"
    elif not_ready:
        reason = "; ".join(
            f"worker {w.worker_id} is {w.state}" + (f": {w.detail}" if w.detail else "") for w in not_ready
        )
    elif len(workers) < expected:
        reason = f"{len(workers)} of {expected} workers ready"
    else:
        reason = None
    body = {
        "status": "ok" if reason is None else "unavailable",
        "workers": [
            {"id": w.worker_id, "state": w.state, "device": w.device, "model": w.model, "detail": w.detail}
            for w in workers
        ],
        "queue_depth": await queue.depth(),
        "model": settings.model,
        "safety_checker": "configured" if settings.safety_checker else "not configured",
    }
    if reason is not None:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if reason is None else 503)
