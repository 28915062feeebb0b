"""Liveness and readiness, for load balancers, container runtimes and `flux-server serve`.

- `GET /health/live`: 200 whenever this API process answers; touches no database. A box
  whose workers wait out a database outage or a model retry is alive: restarting it would
  not help (the container's HEALTHCHECK uses this).
- `GET /health/ready`: 200 when this box can serve: at least `min_ready_workers` of its
  workers are ready (at most as many as it runs); an API-only box (`--role api`) as soon as
  its queue answers, the jobs waiting there for any box's workers. 503 otherwise.
- `GET /health`: the same answer as /health/ready, with the body existing clients read: the
  workers (with a shared queue: every box's workers that are alive, from their heartbeats in
  the database), the queue depth, and `status` "ok", "degraded" (ready, but some workers are
  not: a box with one failed GPU of eight keeps serving) or "unavailable", with the reasons.

A worker whose row says ready but whose heartbeat is older than the queue's alive window is
stale (its process hangs or is gone without a word): it does not count as ready.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.api.deps import get_queue, get_settings
from server.config import Settings
from server.queue.base import WorkerInfo, alive_window

router = APIRouter(tags=["health"])


@dataclass
class Readiness:
    ready: int  # this box's workers that are ready and heartbeating
    needed: int  # how many it takes to serve
    expected: int  # how many the box runs
    reasons: list[str] = field(default_factory=list)  # why some are not ready

    @property
    def serving(self) -> bool:
        return self.ready >= self.needed

    @property
    def status(self) -> str:
        if not self.serving:
            return "unavailable"
        return "degraded" if self.reasons else "ok"


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


def not_ready_reason(worker: WorkerInfo, settings: Settings, now: float) -> str | None:
    """Why a worker does not count as ready, or None when it does."""
    if worker.state != "ready":
        return f"worker {worker.worker_id} is {worker.state}" + (
            f": {worker.detail}" if worker.detail else ""
        )
    silent = now - worker.updated_at
    if silent > alive_window(settings.lease_seconds):
        return f"worker {worker.worker_id} is stale: no heartbeat for {silent:.0f} s"
    return None


def assess(workers: list[WorkerInfo], settings: Settings, now: float) -> Readiness:
    """How ready this box is, from the registered workers (`visible_workers`)."""
    if settings.role == "api":  # serves once its queue answered (it did: the rows are here)
        ready = sum(1 for w in workers if not_ready_reason(w, settings, now) is None)
        reasons = [] if ready else ["no worker of any box is ready yet"]
        return Readiness(ready=ready, needed=0, expected=0, reasons=reasons)
    own = workers
    if settings.shared_queue:
        own = [w for w in workers if w.worker_id.startswith(f"{settings.box}-")]
        if not own and not settings.workers:
            # An API started alone on a shared queue: any box's ready worker serves it.
            ready = sum(1 for w in workers if not_ready_reason(w, settings, now) is None)
            return Readiness(ready, 1, 1, [] if ready else ["no worker of any box is ready yet"])
    # `serve` tells its API how many workers it started; a standalone API waits for one.
    expected = settings.workers or 1
    needed = min(settings.min_ready_workers, expected)
    if not own:
        return Readiness(0, needed, expected, ["no worker has registered yet"])
    problems = [reason for w in own if (reason := not_ready_reason(w, settings, now)) is not None]
    ready = len(own) - len(problems)
    reasons = [f"{ready} of {expected} workers ready", *problems] if ready < expected else problems
    return Readiness(ready, needed, expected, reasons)


async def readiness(request: Request) -> tuple[Readiness, list[WorkerInfo]]:
    settings = get_settings(request)
    workers = visible_workers(await get_queue(request).workers(), settings, time.time())
    return assess(workers, settings, time.time()), workers


@router.get("/health/live", operation_id="health_live", summary="Liveness: 200 while the API answers")
async def health_live() -> JSONResponse:
    return JSONResponse({"status": "alive"})


@router.get(
    "/health/ready", operation_id="health_ready", summary="Readiness: 200 once enough workers are ready"
)
async def health_ready(request: Request) -> JSONResponse:
    state, _ = await readiness(request)
    body: dict[str, object] = {
        "status": state.status,
        "workers_ready": state.ready,
        "workers_needed": state.needed,
        "workers_expected": state.expected,
    }
    if state.reasons:
        body["reasons"] = state.reasons
    return JSONResponse(body, status_code=200 if state.serving else 503)


@router.get("/health", operation_id="health", summary="Readiness with the workers and the queue depth")
async def health(request: Request) -> JSONResponse:
    settings = get_settings(request)
    state, workers = await readiness(request)
    body: dict[str, object] = {
        "status": state.status,
        "box": settings.box,
        "role": settings.role,
        "queue": "postgresql" if settings.shared_queue else "sqlite",
        "workers": [
            {
                "id": w.worker_id,
                "state": w.state,
                "device": w.device,
                "model": w.model,
                "detail": w.detail,
                **({"variants": held} if (held := w.held_variants()) is not None else {}),
            }
            for w in workers
        ],
        "queue_depth": await get_queue(request).depth(),
        "model": settings.model,
        "safety_checker": "configured" if settings.safety_checker else "not configured",
    }
    if state.reasons:
        body["reason"] = "; ".join(state.reasons)
        body["reasons"] = state.reasons
    return JSONResponse(body, status_code=200 if state.serving else 503)
