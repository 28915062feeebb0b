"""Readable logs for every process: quiet by default, one line per request lifecycle event,
`--log-format json` for log shippers.

- `configure_logging(settings, process)` is called once at the start of each process (the
  CLI does it): one handler on stderr, text (`time level process: message`) or JSON (one
  object a line, with the event's fields: `request_id`, `endpoint`, timings).
- Third-party libraries speak only when something fails: transformers, diffusers, torchao,
  accelerate, torch (its dynamo, inductor and pytree loggers) and httpx log errors only,
  their Python warnings and progress bars are dropped. `--log-level debug` keeps them all.
- `event(name, **fields)` writes one line per request lifecycle event (`submitted`,
  `started`, `completed`, `failed`, `cancelled`) on the `flux_server.requests` logger.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from typing import Any

from server.config import Settings

REQUESTS = logging.getLogger("flux_server.requests")
# Libraries whose INFO/DEBUG lines drown a GPU worker's start-up.
NOISY_LOGGERS = (
    "transformers",
    "diffusers",
    "torchao",
    "torch._dynamo",
    "torch._inductor",
    "torch.utils._pytree",
    "torch.distributed",
    "accelerate",
    "httpx",
    "httpcore",
    "PIL",
)
NOISY_WARNING_MODULES = r"(transformers|diffusers|torchao|torch|accelerate)(\.|$)"
STANDARD_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        body.update({k: v for k, v in vars(record).items() if k not in STANDARD_RECORD_FIELDS})
        if record.exc_info:
            body["traceback"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure_logging(settings: Settings, process: str) -> None:
    """One handler on stderr for this process (`api`, `worker w0`, `supervisor`...)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {process}: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        # uvicorn brings its own handlers; one format for every line instead.
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    if settings.log_level != "debug":
        quiet_third_party()


def quiet_third_party() -> None:
    # Before the libraries are imported: tqdm and the hub read these when a bar is made.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=NOISY_WARNING_MODULES)
    warnings.filterwarnings("ignore", category=FutureWarning, module=NOISY_WARNING_MODULES)
    warnings.filterwarnings("ignore", category=UserWarning, module=NOISY_WARNING_MODULES)


def event(name: str, request_id: str, endpoint: str, **fields: Any) -> None:
    """One line for a request lifecycle event; JSON output carries each field on its own."""
    shown = " ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in fields.items())  # fmt: skip
    REQUESTS.info(
        "%s %s %s%s",
        name,
        request_id,
        endpoint,
        f" {shown}" if shown else "",
        extra={"event": name, "request_id": request_id, "endpoint": endpoint, **fields},
    )
