"""Start-up checks for `flux-server serve`, before any child process starts; imports no torch.

Each check fails in seconds with a message naming the flag to fix, so that a broken
configuration never reaches a worker that would spend minutes loading a model first:

- `check_settings`: unsafe or impossible combinations (a non-loopback address without an API
  key, half a TLS pair, missing files, a worker count below one): `ConfigError`, exit 2;
- `check_not_serving_noise`: the tiny test model, chosen by default (no `--model`), on a
  non-loopback address: `ConfigError`, exit 2;
- `check_model`: the weights `--model` names exist and look right (configs and safetensors
  headers only): `ConfigError`;
- `check_storage`: with `--storage-url`, the bucket exists and the credentials may write and
  delete under its prefix (a wrong secret, a missing bucket, an unreachable endpoint):
  `ConfigError`;
- `check_variants`: the same for every `--variant`, and that each is served by a worker and
  every pinned or per-worker name is configured: `ConfigError`;
- `check_port_free`: the API's address can be bound: `StartupError`, exit 1;
- `check_toolchain`: what Triton lacks to compile presets on the GPU workers (a warning: the
  workers then run those presets eager);
- `banner`: what the operator sees once the checks pass: URLs and how to point clients.

Which GPU each worker gets is decided in server/supervisor/gpus.py.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

from server.config import Settings
from server.tenants.keys import KeysFileError, auth_enabled, ring_of

if TYPE_CHECKING:
    from server.supervisor.gpus import WorkerSlot


class ConfigError(Exception):
    """A setting that makes the server refuse to start (exit status 2)."""


class StartupError(Exception):
    """The API process could not come up (port in use, unreadable certificate...): exit 1."""


# --------------------------------------------------------------------------- checks


def check_settings(settings: Settings) -> None:
    """Refuse configurations that would be unsafe or cannot work. Raises ConfigError."""
    if settings.api_keys_file is not None and not Path(settings.api_keys_file).is_file():
        raise ConfigError(f"--api-keys-file {settings.api_keys_file}: no such file")
    try:  # a broken keys file stops the start here, with its reason (never the keys themselves)
        ring = ring_of(settings)
    except (OSError, KeysFileError) as exc:
        raise ConfigError(f"cannot read the keys file {settings.keys_path}: {exc}") from exc
    if not settings.host_is_loopback() and not settings.insecure_no_auth and not ring.enabled:
        raise ConfigError(
            f"refusing to listen on {settings.host} (not a loopback address) without an API key: "
            "give --api-key KEY (or --api-keys-file FILE), or --insecure-no-auth to accept "
            "requests from anyone who can reach this port"
        )
    if (settings.ssl_certfile is None) != (settings.ssl_keyfile is None):
        raise ConfigError("TLS needs both --ssl-certfile and --ssl-keyfile (only one was given)")
    for flag, path in (("--ssl-certfile", settings.ssl_certfile), ("--ssl-keyfile", settings.ssl_keyfile)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if settings.workers is not None and settings.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {settings.workers}")


def check_not_serving_noise(settings: Settings) -> None:
    """A studio must never serve the tiny model's noise by mistake: on an address other
    machines can reach, the tiny model must be asked for (`--model tiny`, `FLUX_MODEL=tiny`),
    never be the default that a forgotten `--model` falls back to. Raises ConfigError."""
    model_given = "model" in settings.model_fields_set  # a flag, FLUX_MODEL or a keyword
    if settings.model == "tiny" and not model_given and not settings.host_is_loopback():
        raise ConfigError(
            f"refusing to serve the tiny test model (its images are noise) on {settings.host} "
            "(not a loopback address): no --model was given. Give --model /path/to/FLUX.1-dev "
            "(or FLUX_MODEL), or --model tiny to serve the test model on purpose"
        )


def check_model(settings: Settings) -> None:
    """Fail fast on a --model that cannot be loaded, before any worker starts.

    models.weights.check.resolve_model checks file names, configs and safetensors headers only, and
    imports no torch. The tiny model is skipped: building it is the worker's job (it needs torch).
    """
    if settings.model == "tiny" or str(settings.components_dir) == "tiny":
        return
    from models.weights.check import WeightsError, resolve_model

    try:
        resolve_model(settings.model, data_dir=settings.data_dir, components_dir=settings.components_dir)
    except (WeightsError, OSError, ValueError) as exc:
        raise ConfigError(f"--model {settings.model}: {exc}") from exc


def check_variants(settings: Settings, slots: list[WorkerSlot]) -> None:
    """Fail fast on a --variant that cannot be loaded (each variant's files, checked as the
    base's are, torch-free; tiny and synthetic ones are built by the workers), on names in
    --pin-variants or --worker-variants that no --variant configures, and on a configured
    variant that no worker of this box serves. Raises ConfigError."""
    from models.request import BASE_VARIANT
    from models.variants.spec import configured_variants, resolve_variants
    from models.weights.check import WeightsError

    base_config = None
    if settings.model not in ("tiny",) and not settings.model.startswith("synthetic"):
        path = Path(settings.model).expanduser()
        folder = path if path.is_dir() else Path(settings.components_dir or "").expanduser()
        config_file = folder / "transformer" / "config.json"
        if config_file.is_file():
            import json

            base_config = json.loads(config_file.read_text(encoding="utf-8"))
    from server.jobs import FAMILY_VARIANTS
    from server.variant_names import fine_tune_name_problem

    # A reserved name would be unreachable under its own fal app id (docs/configuration.md).
    for name in settings.variants:
        if name not in FAMILY_VARIANTS and (problem := fine_tune_name_problem(name)):
            raise ConfigError(f"--variant {name}: {problem}")
    try:
        resolve_variants(settings.variants, model=settings.model, base_transformer_config=base_config)
    except (WeightsError, OSError, ValueError) as exc:
        raise ConfigError(f"--variant: {exc}") from exc
    names = {BASE_VARIANT, *configured_variants(settings.variants, model=settings.model)}
    unknown = sorted({n for n in settings.pin_variants if n not in names})
    unknown += sorted({n for served in settings.worker_variants.values() for n in served if n not in names})
    if unknown:
        raise ConfigError(
            f"--pin-variants / --worker-variants name {', '.join(dict.fromkeys(unknown))}, which no "
            f"--variant configures (configured: {', '.join(sorted(names))})"
        )
    if settings.worker_variants and slots:
        served: set[str] = set()
        for slot in slots:
            own = settings.variants_of_worker(slot.worker_id)
            served |= names if own is None else set(own)
        orphans = sorted(names - served)
        if orphans:
            raise ConfigError(
                f"no worker of this box serves {', '.join(orphans)} (--worker-variants); its requests "
                "would wait for another box's workers: add it to a worker's list"
            )


def check_toolchain(settings: Settings, slots: list[WorkerSlot]) -> str | None:
    """What the GPU workers' compiled presets lack to build Triton kernels (a C compiler,
    Python's headers), as a warning; None when nothing is missing or nothing is compiled.
    Not an error: each worker finds the same and runs those presets eager, with a note in
    every response that asks for one (models/presets/apply.py)."""
    if not any(slot.gpu is not None for slot in slots):
        return None  # a CPU worker's inductor builds C++, not Triton kernels
    from models.presets.policy import PRESETS, default_presets
    from models.toolchain import triton_build_missing

    enabled = settings.presets or default_presets("cuda")
    compiled = [name for name in enabled if name in PRESETS and PRESETS[name].compile != "none"]
    missing = triton_build_missing() if compiled else []
    if not missing:
        return None
    return (
        f"the compiled presets ({', '.join(compiled)}) will run eager on the GPU workers: Triton "
        f"builds its kernels at run time and this machine lacks {' and '.join(missing)}"
    )


def check_storage(settings: Settings) -> None:
    """With `--storage-url`: one write and delete under the prefix, so that wrong credentials
    or a missing bucket stop start-up in seconds with one line. Raises ConfigError."""
    if not settings.storage_url:
        return
    from server.storage.s3_client import BucketLocation, bucket_problem, make_client

    try:
        location = BucketLocation.parse(settings.storage_url)
        problem = bucket_problem(make_client(max_connections=1), location)
    except ValueError as exc:
        raise ConfigError(f"--storage-url {exc}") from exc
    if problem is not None:
        raise ConfigError(problem)


def check_port_free(settings: Settings) -> None:
    """Bind the API's address once, as uvicorn will, so that a busy port fails before any
    worker loads a model. Raises StartupError."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            raise StartupError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from exc


def base_url(settings: Settings) -> str:
    scheme = "https" if settings.ssl_certfile else "http"
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.port}"


def describe_queue(settings: Settings) -> str:
    if settings.queue_url is None:
        return f"SQLite {settings.db_path}"
    from server.queue.postgres.connection import describe

    return f"PostgreSQL {describe(settings.queue_url)}; files {settings.storage_url or settings.files_dir}"


def banner(settings: Settings, slots: list[WorkerSlot]) -> str:
    url = base_url(settings)
    hostport = url.split("://", 1)[1]
    tls = settings.ssl_certfile is not None
    auth = auth_enabled(settings)
    devices = ", ".join(f"{s.worker_id} on {s.device}" for s in slots)
    lines: list[str | None] = [
        "flux-server",
        f"  URL      {url}"
        + (f"  (listening on {settings.host})" if settings.host in ("0.0.0.0", "::") else ""),
        f"  public   {settings.public_url}" if settings.public_url else None,
        f"  model    {settings.model}",
        f"  workers  {len(slots)}: {devices}",
        f"  auth     {'on (' + str(ring_of(settings).count) + ' key(s))' if auth else 'off'}",
        f"  TLS      {'on' if tls else 'off'}",
        f"  data     {settings.data_dir}",
        f"  storage  {settings.storage_url}" if settings.storage_url else None,
        f"  queue    {describe_queue(settings)}; role {settings.role}; box {settings.box}",
        "",
        "Point fal_client (Python) at it:",
        f"  export FAL_QUEUE_RUN_HOST={hostport}",
        f"  export FAL_RUN_HOST={hostport}/run",
        f"  export FAL_KEY={'<one of your API keys>' if auth else 'anything'}",
    ]
    if tls:
        lines.append("  export SSL_CERT_FILE=<bundle.pem from flux-server make-cert>")
    else:
        lines.append(
            "  (fal_client always uses https: serve with --ssl-certfile/--ssl-keyfile; see make-cert)"
        )
    lines += [
        "@fal-ai/client (JS): proxyUrl {url: " + repr(url + "/api/fal/proxy") + ', when: "always"}',
        f"Health: {url}/health/ready (readiness), {url}/health/live (liveness)",
    ]
    return "\n".join(line for line in lines if line is not None) + "\n"
