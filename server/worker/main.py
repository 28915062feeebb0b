"""`flux-server worker`: one worker process (server/worker/loop.py), on the GPU it is given."""

from __future__ import annotations

import logging
import os
import signal
import threading

from server.config import Settings
from server.worker.loop import Worker


def run_worker(settings: Settings, worker_id: str | None = None, gpu: str | int | None = None) -> int:
    """Serve jobs until SIGTERM; the exit status says why it ended (server/exit_codes.py).

    `gpu`: this worker's entry of the parent's CUDA_VISIBLE_DEVICES as given (an index, a
    GPU UUID or a MIG id), set verbatim before anything imports torch, so that the worker's
    only visible device, `cuda:0`, is that GPU."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = Worker(settings, worker_id=worker_id)

    def on_signal(_signum: int, _frame: object) -> None:
        worker.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    return worker.run()
