"""Helper threads that cannot die silently: an exception escaping one ends the process with
EXIT_HELPER_DIED (after logging its traceback), so that the supervisor starts a fresh worker
instead of leaving one whose leases are no longer renewed or whose jobs are never completed."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable

from server.exit_codes import EXIT_HELPER_DIED

logger = logging.getLogger(__name__)


def start_helper(
    name: str, target: Callable[[], None], exit_process: Callable[[int], None]
) -> threading.Thread:
    def guarded() -> None:
        try:
            target()
        except BaseException:
            logger.critical(
                "the worker's %s thread died; exiting so that it is restarted", name, exc_info=True
            )
            exit_process(EXIT_HELPER_DIED)

    thread = threading.Thread(target=guarded, name=name, daemon=True)
    thread.start()
    return thread


def hard_exit(code: int) -> None:
    """End the process now from any thread (the main thread may be stuck in a GPU call):
    flush the logs, then `os._exit`."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
