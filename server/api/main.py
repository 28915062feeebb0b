"""`flux-server api`: the HTTP process alone (no torch import), served by uvicorn.

With `api_processes` > 1, uvicorn runs that many processes on one listening socket; each
builds its own app (queue connection, wake-up socket, background tasks) from the settings,
which reach it through the environment (`Settings.to_env`).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import signal
import sys

import uvicorn
from fastapi import FastAPI

from server.api.app import create_app
from server.config import Settings
from server.logs import configure_logging
from server.tenants.keys import auth_enabled

EXIT_UNSAFE = 2


def unsafe_listen_reason(settings: Settings) -> str | None:
    """Why the settings must not be served, or None: no API key on a non-loopback address."""
    if settings.host_is_loopback() or auth_enabled(settings) or settings.insecure_no_auth:
        return None
    return (
        f"refusing to listen on {settings.host} without an API key: anyone who can reach it could "
        "use the GPU. Pass --api-key KEY (or FLUX_API_KEY / --api-keys-file), listen on 127.0.0.1, "
        "or pass --insecure-no-auth if the network is trusted."
    )


def default_api_processes(cpu_count: int | None = None) -> int:
    """Two API processes where the cores allow (they halve burst latency: docs/benchmarks.md);
    one on a machine of fewer than 4 cores, where a second would take a core from the worker."""
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return 2 if cores >= 4 else 1


def app_from_environment() -> FastAPI:
    """The app factory each of several API processes calls (settings from FLUX_*)."""
    if sys.platform.startswith("linux"):
        from server.child_process import set_parent_death_signal

        # If uvicorn's manager process is killed outright, its processes go at once too: a
        # graceful shutdown would keep the port from the API that `serve` restarts.
        set_parent_death_signal(signal.SIGKILL)
    settings = Settings()
    configure_logging(settings, "api")  # a fresh process: uvicorn started it from an import string
    return frozen(create_app(settings))


def frozen(app: FastAPI) -> FastAPI:
    """Move everything built so far (modules, the app) out of the garbage collector's sight:
    it lives as long as the process, and a full collection re-scanning it stalled a burst of
    1000 submits by a tenth of a second."""
    gc.freeze()
    return app


def run_api(settings: Settings) -> int:
    reason = unsafe_listen_reason(settings)
    if reason is not None:
        print(f"flux-server: {reason}", file=sys.stderr)
        return EXIT_UNSAFE
    processes = settings.api_processes or default_api_processes()
    app: FastAPI | str
    if processes > 1:
        # uvicorn starts its processes from an import string; they inherit the environment.
        os.environ.update(settings.to_env())
        app = "server.api.main:app_from_environment"
    else:
        app = frozen(create_app(settings))
    uvicorn.run(
        app,
        factory=processes > 1,
        workers=processes,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_level=settings.log_level,
        log_config=None,  # keep server/logs.py's format (configured by the CLI)
        access_log=False,  # one line per status poll costs throughput; use a proxy's log
        # Forwarded headers are the app's business, trusted only from --trusted-proxy
        # addresses (server/api/deps.py); uvicorn would believe any loopback peer.
        proxy_headers=False,
        http="httptools" if importlib.util.find_spec("httptools") else "auto",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "auto",
        timeout_graceful_shutdown=5,
    )
    return 0
