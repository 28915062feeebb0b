"""`flux-server` command line: serve | api | worker | health | generate | keys | migrate-queue | make-cert.

Every subcommand's work lives in its own module, imported lazily so that the API process
never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.config import Settings
from server.exit_codes import EXIT_USAGE
from server.supervisor import keys_cli

# Flags shared by serve/api/worker; each maps to a Settings field (env FLUX_<NAME>).
_SERVER_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--model", {"help": "diffusers folder, single-file transformer (.safetensors), 'tiny' or 'synthetic'"}),
    ("--components-dir", {"help": "folder with the other components when --model is a single file"}),
    (
        "--variant",
        {
            "action": "append",
            "dest": "variants",
            "help": "NAME=PATH: a further checkpoint (fill, kontext, krea or a fine-tune's name; repeatable)",
        },
    ),
    (
        "--worker-variants",
        {
            "action": "append",
            "help": "WORKER=NAME,NAME: the variants a worker serves (repeatable; docs/variants.md)",
        },
    ),
    ("--pin-variants", {"help": "comma-separated variants never evicted from a worker's GPU"}),
    ("--variant-gpu-budget-bytes", {"type": int, "help": "GPU memory the variants' transformers may take"}),
    ("--variant-gpu-reserve-bytes", {"type": int, "help": "GPU memory kept for activations (default 8 GiB)"}),
    ("--variant-host-budget-bytes", {"type": int, "help": "pinned host memory for variants, per worker"}),
    ("--safety-checker", {"help": "local image-classification model folder (NSFW checker)"}),
    ("--data-dir", {"help": "queue database, outputs, tiny model and caches"}),
    ("--queue-url", {"help": "postgresql://user:password@host:port/dbname: a queue shared by many boxes"}),
    ("--files-dir", {"help": "generated files and uploads (default <data-dir>/files; a shared mount)"}),
    ("--storage-url", {"help": "s3://bucket/prefix: keep files in object storage instead (AWS_* settings)"}),
    ("--storage-public-url", {"help": "public base URL of the bucket's objects (else presigned URLs)"}),
    ("--storage-retry-seconds", {"type": float, "help": "retry storing outputs in a bucket outage"}),
    (
        "--role",
        {"choices": ["all", "api", "workers"], "help": "serve: API and workers, API only, or workers only"},
    ),
    ("--box-name", {"help": "this box's name in a shared queue (default: host name + data-dir hash)"}),
    ("--host", {}),
    ("--port", {"type": int}),
    ("--public-url", {"help": "base of the URLs the server returns (default: from the request)"}),
    ("--ssl-certfile", {}),
    ("--ssl-keyfile", {}),
    ("--api-key", {"action": "append", "help": "accepted API key (repeatable)"}),
    (
        "--api-keys-file",
        {"help": "named keys (flux-server keys add) or one key a line; default <data-dir>/keys.json"},
    ),
    ("--url-signing-key", {"help": "secret that signs /files URLs (default: generated into the data dir)"}),
    ("--insecure-no-auth", {"action": "store_true", "default": None}),
    ("--metrics-key", {"help": "key that reads /metrics (default: the API keys)"}),
    (
        "--trusted-proxy",
        {"action": "append", "help": "proxy address/network whose X-Forwarded-* count"},
    ),
    ("--cors-origin", {"action": "append", "help": "browser origin allowed to call the API (repeatable)"}),
    ("--max-prompt-length", {"type": int, "help": "longest prompt accepted, in characters (default 4000)"}),
    ("--max-request-bytes", {"type": int, "help": "largest request body (default: one input image + 1 MiB)"}),
    ("--log-format", {"choices": ["text", "json"], "help": "text (default) or one JSON object a line"}),
    ("--log-level", {"choices": ["debug", "info", "warning", "error"]}),
    ("--api-processes", {"type": int, "help": "API processes sharing the port (default 2, 1 below 4 cores)"}),
    ("--workers", {"type": int, "help": "worker processes (default: one per GPU, else one)"}),
    ("--device", {"choices": ["auto", "cpu", "cuda"]}),
    ("--default-acceleration", {"choices": ["none", "regular", "high"]}),
    ("--presets", {"help": "comma-separated presets to load and warm (none,regular,high)"}),
    ("--warmup-sizes", {"help": "comma-separated WxH sizes to compile for before ready"}),
    (
        "--preset-tuning",
        {
            "help": "comma-separated tuning pieces on every preset but none: inductor-flags, compiled-vae, "
            "cuda-graphs, fa3, cudnn-attention, static-shapes, max-autotune"
        },
    ),
    (
        "--memory-plan",
        {
            "help": "auto, resident, fp8-offload-text, fp8-storage-offload-text, model-offload, "
            "sequential-offload"
        },
    ),
    ("--retention-seconds", {"type": float}),
    ("--idempotency-window-seconds", {"type": float}),
    ("--max-upload-bytes", {"type": int, "help": "largest file a client may upload (fal storage)"}),
    (
        "--min-free-disk-bytes",
        {"type": int, "help": "refuse submits and uploads below this free space (default 1 GiB; 0: off)"},
    ),
    ("--lease-seconds", {"type": float}),
    (
        "--load-retry-seconds",
        {
            "type": float,
            "help": "wait before starting again a worker whose model failed to load (default 300)",
        },
    ),
    (
        "--min-ready-workers",
        {"type": int, "help": "ready workers this box needs to report ready (default 1)"},
    ),
    ("--watchdog-seconds", {"type": float, "help": "restart a worker whose job makes no progress this long"}),
    ("--max-consecutive-failures", {"type": int, "help": "a worker stops after this many failures in a row"}),
    ("--fetch-allow", {"action": "append", "help": "only fetch from these hosts/networks (repeatable)"}),
    ("--fetch-deny", {"action": "append", "help": "never fetch from these hosts/networks (repeatable)"}),
    (
        "--outbound-allow",
        {"action": "append", "help": "loopback/link-local hosts or networks fetches may reach (repeatable)"},
    ),
    ("--lora-dir", {"help": "folder of LoRA files that requests may name (the studio's library)"}),
    ("--lora-cache-dir", {"help": "downloaded LoRAs (default <data-dir>/lora-cache)"}),
    ("--lora-cache-bytes", {"type": int, "help": "size bound of the LoRA download cache"}),
    ("--lora-max-bytes", {"type": int, "help": "largest single LoRA file"}),
    ("--lora-max-per-request", {"type": int}),
    ("--lora-download-timeout", {"type": float, "help": "seconds allowed to download one LoRA URL"}),
    ("--lora-max-rank", {"type": int, "help": "highest LoRA rank accepted"}),
    ("--lora-hotswap", {"choices": ["off", "lazy", "eager"], "help": "when compiled presets get LoRA slots"}),
    ("--lora-hotswap-rank", {"type": int, "help": "rank of the hot-swap slots (default 64)"}),
    ("--webhook-allowlist", {"help": "comma-separated host names webhooks may be sent to"}),
    ("--webhook-retry-base-seconds", {"type": float, "help": "first webhook retry delay (doubles)"}),
]


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    for flag, kwargs in _SERVER_FLAGS:
        parser.add_argument(flag, **{"default": None, **kwargs})


def _field(flag: str, kwargs: dict[str, Any]) -> str:
    return kwargs.get("dest") or flag[2:].replace("-", "_")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment first, then every flag the user actually gave."""
    overrides = {
        _field(flag, kwargs): getattr(args, _field(flag, kwargs))
        for flag, kwargs in _SERVER_FLAGS
        if getattr(args, _field(flag, kwargs), None) is not None
    }
    return Settings(**overrides)


def queue_problem(settings: Settings) -> str | None:
    """Why the queue cannot be opened (one line naming where and why), or None. Also creates
    or migrates its schema, once, before any child process starts."""
    from server.queue.base import QueueUnavailable
    from server.queue.factory import open_queue

    try:
        open_queue(settings, role="cli").close()
    except (QueueUnavailable, ValueError) as exc:
        return str(exc)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="API and supervised workers (the one command to run)")
    _add_server_flags(serve)
    api = sub.add_parser("api", help="the API process alone (no torch)")
    _add_server_flags(api)
    health = sub.add_parser("health", help="exit 0 when the server on this box answers (HEALTHCHECK)")
    _add_server_flags(health)
    health.add_argument(
        "--ready", action="store_true", help="ask /health/ready (enough workers ready), not /health/live"
    )
    worker = sub.add_parser("worker", help="one worker process alone")
    _add_server_flags(worker)
    worker.add_argument("--worker-id", default=None)
    worker.add_argument(
        "--gpu", default=None, help="this worker's GPU: a CUDA_VISIBLE_DEVICES entry (index, UUID or MIG id)"
    )

    gen = sub.add_parser("generate", help="generate images from the command line")
    gen.add_argument("--model", default="tiny")
    gen.add_argument("--components-dir", default=None)
    gen.add_argument("--safety-checker", default=None)
    gen.add_argument("--data-dir", default=None)
    gen.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, help="output file; with --num-images N, -1..-N suffixes")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--steps", type=int, default=28)
    gen.add_argument("--guidance", type=float, default=3.5)
    gen.add_argument("--size", default="landscape_4_3", help="preset name or WxH")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--image", default=None, help="input image for image-to-image")
    gen.add_argument("--strength", type=float, default=0.95)
    gen.add_argument("--acceleration", default="none", choices=["none", "regular", "high"])

    migrate = sub.add_parser(
        "migrate-queue", help="copy this install's SQLite queue into PostgreSQL (with the server stopped)"
    )
    migrate.add_argument("--data-dir", default=None, help="the data directory holding queue.sqlite3")
    migrate.add_argument("--queue-url", required=True, help="postgresql://user:password@host:port/dbname")

    keys_cli.add_parser(sub)

    cert = sub.add_parser("make-cert", help="write a local CA and a server certificate")
    cert.add_argument("--out", required=True)
    cert.add_argument("--host", action="append", default=[], help="extra DNS name or IP (repeatable)")
    return parser


def health_command(settings: Settings, *, ready: bool = False) -> int:
    """`flux-server health`: exit 0 when this box's API answers /health/live with 200 (the
    container's HEALTHCHECK: a box whose workers wait for the database or a retry is alive,
    and restarting it would not help); with `ready`, /health/ready. 1 otherwise, with the
    reason on stderr."""
    import httpx

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.ssl_certfile else "http"
    try:
        # Loopback only, often with a self-signed certificate: checking it proves nothing here.
        path = "/health/ready" if ready else "/health/live"
        response = httpx.get(f"{scheme}://{host}:{settings.port}{path}", timeout=5.0, verify=False)
    except httpx.HTTPError as exc:
        print(f"flux-server health: {exc!r}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"flux-server health: {response.status_code} {response.text[:500]}", file=sys.stderr)
        return 1
    return 0


def use_metrics_directory(settings: Settings) -> None:
    """Where this process writes its Prometheus samples (server/metrics.py), unless `serve`
    already chose; before anything imports prometheus_client."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        directory = settings.run_dir / "metrics"
        directory.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "generate":
        from server.supervisor.generate import run_generate

        return run_generate(args)
    if args.command == "migrate-queue":
        from server.queue.migrate import migrate_queue_command

        return migrate_queue_command(Path(args.data_dir or Settings().data_dir), args.queue_url)
    if args.command == "keys":
        return keys_cli.run_keys(args)
    if args.command == "make-cert":
        from server.tls import make_cert_command

        return make_cert_command(args)

    settings = settings_from_args(args)
    if args.command == "health":
        return health_command(settings, ready=args.ready)
    from server.logs import configure_logging

    worker_name = f"worker {args.worker_id}" if getattr(args, "worker_id", None) else "worker"
    configure_logging(settings, {"serve": "supervisor", "api": "api", "worker": worker_name}[args.command])
    problem = queue_problem(settings)
    if problem is not None and args.command == "worker":
        from server.worker.faults import queue_misconfigured

        # A database that is away is waited for (server.worker): an outage never stops a
        # worker for good. A wrong password or database name is refused here, at once.
        away = problem.startswith("the queue database at") and not queue_misconfigured(problem)
        problem = None if away else problem
    if problem is not None:
        print(f"flux-server: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "serve":
        from server.supervisor.serve import serve

        return serve(settings)
    if args.command in ("api", "worker"):
        use_metrics_directory(settings)
    if args.command == "api":
        from server.api.main import run_api

        return run_api(settings)
    if args.command == "worker":
        from server.worker import run_worker

        return run_worker(settings, worker_id=args.worker_id, gpu=args.gpu)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
