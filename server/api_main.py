"""`flux-server api`: the HTTP process alone (no torch import), served by uvicorn."""

from __future__ import annotations

import importlib.util
import sys

import uvicorn

from server.app import create_app
from server.config import Settings

EXIT_UNSAFE = 2


def unsafe_listen_reason(settings: Settings) -> str | None:
    """Why the settings must not be served, or None: no API key on a non-loopback address."""
    if settings.host_is_loopback() or settings.auth_enabled or settings.insecure_no_auth:
        return None
    return (
        f"refusing to listen on {settings.host} without an API key: anyone who can reach it could "
        "use the GPU. Pass --api-key KEY (or FLUX_API_KEY / --api-keys-file), listen on 127.0.0.1, "
        "or pass --insecure-no-auth if the network is trusted."
    )


def run_api(settings: Settings) -> int:
    reason = unsafe_listen_reason(settings)
    if reason is not None:
        print(f"flux-server: {reason}", file=sys.stderr)
        return EXIT_UNSAFE
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_level="info",
        access_log=False,  # one line per status poll costs throughput; use a proxy's log
        http="httptools" if importlib.util.find_spec("httptools") else "auto",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "auto",
        timeout_graceful_shutdown=5,
    )
    return 0
