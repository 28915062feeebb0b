"""App factory: one FastAPI app carrying every protocol, on one queue.

Router order matters: fal's routes are path patterns (`/{owner}/{app}/...`) that would also
match `/v1/...`, so the fixed-path protocols are included first.

CONTRACT for protocol packages: `server/protocols/<name>/routes.py` exposes `router:
APIRouter`. Shared objects live on `app.state` (see server/deps.py): `settings`, `queue`,
`storage`.
"""

from __future__ import annotations

from fastapi import FastAPI

from server.config import Settings


def create_app(settings: Settings) -> FastAPI:
    raise NotImplementedError("built by the fal queue work (issue 3)")
