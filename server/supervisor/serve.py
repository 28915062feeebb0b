"""`flux-server serve`: the start-up checks (server/supervisor/preflight.py), the banner, then
the supervisor's run loop (server/supervisor/loop.py)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from server.config import Settings
from server.exit_codes import EXIT_USAGE
from server.supervisor.gpus import plan_workers
from server.supervisor.loop import Supervisor
from server.supervisor.preflight import (
    ConfigError,
    StartupError,
    banner,
    check_model,
    check_not_serving_noise,
    check_port_free,
    check_settings,
    check_storage,
    check_toolchain,
)

logger = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s", stream=sys.stderr
    )
    try:
        if settings.role != "workers":  # a workers-only box listens on no port
            check_settings(settings)
        if settings.role == "all":  # its own workers' images, on its own address
            check_not_serving_noise(settings)
        settings = settings.model_copy(update={"data_dir": Path(settings.data_dir).resolve()})
        if settings.role != "api":  # an API-only box loads no model
            check_model(settings)
        check_storage(settings)
        slots = plan_workers(settings)
        # The children see the resolved count: the API's readiness counts against it.
        settings = settings.model_copy(update={"workers": len(slots)})
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError) as exc:
        print(f"flux-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if settings.role != "workers":
            check_port_free(settings)
    except StartupError as exc:
        print(f"flux-server: {exc}", file=sys.stderr)
        return 1
    print(banner(settings, slots), flush=True)
    if settings.role != "api" and (toolchain := check_toolchain(settings, slots)):
        logger.warning("%s", toolchain)
    return Supervisor(settings, slots).run()
