"""`GET /health`: 200 only when the workers this box is waiting for are ready.

Load balancers and `flux-server serve` use it; the body says why the server is not ready,
lists the workers (with a shared queue: every box's workers that are alive, from their
heartbeats in the database) and the queue depth.

- One box (SQLite): every worker that `serve` started must be loaded and warmed.
- Many boxes (a shared queue): a box that runs workers waits for its own; an API-only box is
  ready once any box has a ready worker. Workers of other boxes that stopped heartbeating
  are left out: they are gone.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.config import Settings
from server.deps import get_queue, get_settings
from server.queue.base import WorkerInfo, alive_window

router = APIRouter(tags=["health"])


def visible_workers(workers: list[WorkerInfo], settings: Settings, now: float) -> list[WorkerInfo]:
    """This box's workers, and the other boxes' workers that are alive."""
    if not settings.shared_queue:
        return workers
    window = alive_window(settings.lease_seconds)
    own = f"{settings.box}-"
    return [
        w
        for w in workers
        if w.worker_id.startswith(own) or (w.state != "stopped" and now - w.updated_at <= window)
    ]


def not_ready_reason(workers: list[WorkerInfo], settings: Settings) -> str | None:
    own = (
        [w for w in workers if w.worker_id.startswith(f"{settings.box}-")]
        if settings.shared_queue
        else workers
    )
    if settings.shared_queue and (settings.role == "api" or (not own and not settings.workers)):
        if any(w.state == "ready" for w in workers):
            return None
        return "no worker of any box is ready yet"
    not_ready = [w for w in own if w.state != "ready"]
    # `serve` tells its API how many workers it started; a standalone API waits for one.
    expected = settings.workers or 1
    if not own:
        return "no worker has registered yet"
    if not_ready:
        return "; ".join(
            f"worker {w.worker_id} is {w.state}" + (f": {w.detail}" if w.detail else "") for w in not_ready
        )
    if len(own) < expected:
        return f"{len(own)} of {expected} workers ready"
    return None


@router.get("/health", operation_id="health", summary="Readiness: 200 once every worker is ready")
async def health(request: Request) -> JSONResponse:
    queue = get_queue(request)
    settings = get_settings(request)
    workers = visible_workers(await queue.workers(), settings, time.time())
    reason = not_ready_reason(workers, settings)
    body = {
        "status": "ok" if reason is None else "unavailable",
        "box": settings.box,
        "role": settings.role,
        "queue": "postgresql" if settings.shared_queue else "sqlite",
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
