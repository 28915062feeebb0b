"""One settings object for every process: environment variables `FLUX_*`, CLI flags override.

The supervisor (`flux-server serve`) passes its resolved settings to the API and worker
children through the environment, so every process sees the same values.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}
TuningPiece = Literal[
    "inductor-flags", "compiled-vae", "cuda-graphs", "fa3", "cudnn-attention", "static-shapes", "max-autotune"
]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLUX_", extra="ignore")

    # Weights: a diffusers folder, a single-file transformer (+ components_dir), or "tiny".
    model: str = "tiny"
    components_dir: Path | None = None
    # Further checkpoints of the FLUX.1 [dev] family, by name: "fill", "kontext", "krea" (fixed
    # names) and fine-tunes under names of their own; each a diffusers folder or a single-file
    # transformer sharing the base's text encoders and VAE. FLUX_VARIANTS='{"krea": "/w/krea"}'
    # or `--variant krea=/w/krea` (repeatable). With --model tiny/synthetic, the value "tiny"/
    # "synthetic" builds that variant the same way.
    variants: dict[str, str] = Field(default_factory=dict)
    # Which variants each worker serves (docs/variants.md): FLUX_WORKER_VARIANTS="w0=dev,fill;w1=
    # kontext,krea" (`--worker-variants w0=dev,fill`, repeatable) by worker id, or "dev,fill" for
    # every worker of the box; a worker not named serves every variant. Empty: all serve all.
    worker_variants: Annotated[dict[str, list[str]], NoDecode] = Field(default_factory=dict)
    # Variants never evicted from a worker's GPU (FLUX_PIN_VARIANTS=dev,fill).
    pin_variants: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Residency (models/residency.py): the GPU memory variants' transformers may take (None: the
    # device's memory minus the reserve and the shared text encoders and VAE), the reserve kept
    # for activations, and the pinned host memory their home copies may take per worker (None:
    # half the machine's memory shared among its workers); beyond it, homes are spill files.
    variant_gpu_budget_bytes: int | None = Field(default=None, ge=0)
    variant_gpu_reserve_bytes: int = Field(default=8 * 1024**3, ge=0)
    variant_host_budget_bytes: int | None = Field(default=None, ge=0)
    safety_checker: Path | None = None

    # Where the queue database, generated files, the tiny model and compile caches live.
    data_dir: Path = Path(".flux-data")
    # The queue: None is SQLite in the data directory (one box); a postgresql:// URL is a
    # PostgreSQL server shared by many boxes.
    queue_url: str | None = None
    # Generated files, uploads and stored inputs; many boxes point it at one shared mount.
    files_dir: Path = Field(default_factory=lambda values: values["data_dir"] / "files")
    # Or an S3-compatible bucket instead (s3://bucket/prefix; endpoint, region and credentials
    # from the AWS_* variables and profiles, as every AWS SDK reads them): boxes then share no
    # directory. See server/storage/s3.py and docs/deploy.md, "Object storage".
    storage_url: str | None = None
    # Base URL under which the bucket's objects are readable without a signature (a CDN, a
    # public-read bucket): returned URLs are this base + the object's key instead of presigned.
    storage_public_url: str | None = None
    # A worker retries storing a job's images this long while the bucket is unreachable, then
    # fails the job. Keep it below --watchdog-seconds: storing counts as no progress.
    storage_retry_seconds: float = Field(default=120.0, ge=0)
    # What `serve` runs on this box: the API and workers, only the API, or only workers.
    role: Literal["all", "api", "workers"] = "all"
    # Names this box's workers in a shared queue; default: host name + a hash of the data dir.
    box_name: str | None = None

    # HTTP
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None  # base of returned URLs; default: derived from each request
    # Addresses or networks of reverse proxies whose X-Forwarded-Proto/-Host are believed.
    trusted_proxy: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Browser origins allowed to call the API from their pages (CORS); none by default.
    cors_origin: Annotated[list[str], NoDecode] = Field(default_factory=list)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    api_key: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Named keys (JSON, hashes only; `flux-server keys add`) or legacy plain keys, one a line.
    # None: <data_dir>/keys.json, used when it exists. Re-read on change (server/tenants/keys.py).
    api_keys_file: Path | None = None
    # HMAC key that signs returned /files URLs (server/api/signing.py); None: a key generated
    # once into <data_dir>/url-signing.key. Boxes sharing a files mount must share this key.
    url_signing_key: str | None = None
    insecure_no_auth: bool = False
    metrics_key: str | None = None  # accepted on /metrics instead of the API keys
    # API processes sharing the port (uvicorn workers); each is a full API on the same queue.
    api_processes: int | None = Field(default=None, ge=1)  # None: server.api.main decides

    # Logs: one line per request lifecycle event; json for log shippers (server/logs.py).
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # Workers
    workers: int | None = None  # default: one per visible GPU, else one on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lease_seconds: float = 30.0  # a worker that stops renewing loses its job after this
    # A worker whose model could not load is started again after this long: a transient
    # out-of-memory or a weights mount that came back late is not forever.
    load_retry_seconds: float = Field(default=300.0, gt=0)
    # /health/ready (and /health) answer 200 once this many of the box's workers are ready (at
    # most as many as it runs): a box with one failed GPU of eight keeps serving, "degraded".
    min_ready_workers: int = Field(default=1, ge=1)
    # A held job without a step or stage change for this long ends its worker (0: never).
    watchdog_seconds: float = Field(default=600.0, ge=0)
    # Internal failures in a row after which a worker stops taking jobs and exits (0: never).
    max_consecutive_failures: int = Field(default=3, ge=0)

    # Acceleration (see models/presets/policy.py)
    # The preset of every request that names none: fal (a path's "default" too), BFL and OpenAI
    # (whose APIs have no preset field). None: each path's documented default (fal-ai/flux/dev
    # "none", the aggregator path fal-ai/flux-1/dev "regular", BFL and OpenAI "none").
    default_acceleration: Literal["none", "regular", "high"] | None = None
    # Empty means the device's defaults (models/presets/policy.py: default_presets, default_warmup_sizes).
    presets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    warmup_sizes: Annotated[list[str], NoDecode] = Field(default_factory=list)  # "WxH" items
    memory_plan: str = "auto"
    # flux-fast's tuning pieces on every preset but `none`, each off until a GPU measurement shows
    # it helps (docs/benchmarks.md); the names are models/presets/policy.py's TUNING.
    preset_tuning: Annotated[list[TuningPiece], NoDecode] = Field(default_factory=list)

    # Inputs, outputs, retention
    max_input_image_bytes: int = 20 * 1024 * 1024
    # Longest prompt accepted (characters); FLUX's T5 reads 512 tokens, about 2000 characters.
    max_prompt_length: int = Field(default=4000, ge=1)
    # Largest request body (bytes) on every protocol; default: room for one input image,
    # base64-encoded, plus 1 MiB for the rest of the request.
    max_request_bytes: int | None = Field(default=None, ge=1024)
    input_fetch_timeout: float = 10.0
    # Input images decoded at once per API process (the others wait); None: one per core.
    input_decode_threads: int | None = Field(default=None, ge=1)
    retention_seconds: float = 24 * 3600.0
    # How long a submit's Idempotency-Key stands for its request (server/queue/idempotency.py).
    idempotency_window_seconds: float = Field(default=24 * 3600.0, gt=0)
    # fal storage uploads: the largest file, and the longest lifetime a client's lifecycle
    # header may ask for (without one, an upload lives for retention_seconds).
    max_upload_bytes: int = Field(default=1024**3, gt=0)
    max_upload_retention_seconds: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Below this many free bytes on the files directory's or the SQLite queue's filesystem,
    # the API refuses submits and uploads with 507 (reads go on); 0 disables the floor.
    min_free_disk_bytes: int = Field(default=1024**3, ge=0)

    # Outbound fetches (input images, webhooks, LoRA URLs): host names, "*.domain" patterns,
    # addresses or networks; see server/fetch.py. Loopback, link-local, metadata and
    # unspecified addresses are closed unless `outbound_allow` opens them; private ranges are open.
    outbound_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    fetch_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: any other
    fetch_deny: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # LoRAs (fal-ai/flux-lora): where they come from and how many a request may use
    lora_dir: Path | None = None  # the studio's LoRA library; requests name files inside it
    lora_cache_dir: Path | None = None  # downloaded LoRAs; default <data_dir>/lora-cache
    lora_cache_bytes: int = Field(default=20 * 1024**3, ge=0)  # least recently used goes first
    lora_max_bytes: int = Field(default=2 * 1024**3, ge=1)  # one LoRA file
    lora_max_total_bytes: int = Field(default=4 * 1024**3, ge=1)  # all LoRAs of one request
    lora_max_per_request: int = Field(default=3, ge=1)
    lora_max_rank: int = Field(default=128, ge=1)  # highest rank accepted
    # Hot-swap slots on compiled presets (models/lora/hotswap.py): made at the first LoRA
    # request (lazy), at load (eager), or never (off: LoRA requests run eager); their rank.
    lora_hotswap: Literal["off", "lazy", "eager"] = "lazy"
    lora_hotswap_rank: int = Field(default=64, ge=1)
    lora_max_loaded: int = Field(default=8, ge=1)  # LoRAs kept in memory per worker
    lora_download_timeout: float = Field(default=120.0, gt=0)

    # Webhooks
    webhook_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)  # host names
    webhook_user_id: str = "flux-server"
    # First retry delay; doubles per failed attempt (10 attempts over about 2 h with 15 s).
    webhook_retry_base_seconds: float = 15.0

    @field_validator("variants", mode="before")
    @classmethod
    def _name_equals_path(cls, value: object) -> object:
        """`--variant NAME=PATH` (repeatable) arrives as a list of NAME=PATH items."""
        if isinstance(value, list):
            pairs = [str(item).partition("=") for item in value]
            bad = [item for item, (_, sep, path) in zip(value, pairs, strict=True) if not sep or not path]
            if bad:
                raise ValueError(f"--variant takes NAME=PATH, got {bad[0]!r}")
            return {name.strip(): path.strip() for name, _, path in pairs}
        return value

    @field_validator("worker_variants", mode="before")
    @classmethod
    def _worker_variants(cls, value: object) -> object:
        """ "w0=dev,fill;w1=kontext" or a list of such items; without "=": every worker ("*")."""
        if isinstance(value, str):
            if value.strip().startswith("{"):
                return json.loads(value)
            value = [item for item in value.split(";") if item.strip()]
        if isinstance(value, list):
            parsed: dict[str, list[str]] = {}
            for item in value:
                worker, _, names = str(item).rpartition("=") if "=" in str(item) else ("*", "", str(item))
                parsed[worker.strip() or "*"] = [n.strip() for n in names.split(",") if n.strip()]
            return parsed
        return value

    def variants_of_worker(self, worker_id: str) -> list[str] | None:
        """The variants `worker_id` serves (None: every configured one). A worker is named by
        its id or by its id's last part ("w0" for "box-a-w0")."""
        for key in (worker_id, worker_id.rsplit("-", 1)[-1], "*"):
            if key in self.worker_variants:
                return self.worker_variants[key]
        return None

    @field_validator(
        "api_key",
        "pin_variants",
        "presets",
        "preset_tuning",
        "warmup_sizes",
        "webhook_allowlist",
        "trusted_proxy",
        "cors_origin",
        "fetch_allow",
        "fetch_deny",
        "outbound_allow",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    # --- derived ------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        return self.data_dir / "queue.sqlite3"

    @property
    def box(self) -> str:
        """This box's name in a shared queue: unique per host and data directory, so that two
        boxes on one host (as in the tests) still differ, and stable across restarts."""
        if self.box_name:
            return self.box_name
        digest = hashlib.sha1(str(Path(self.data_dir).resolve()).encode()).hexdigest()[:6]
        return f"{socket.gethostname()}-{digest}"

    @property
    def shared_queue(self) -> bool:
        """Whether other boxes may use this queue too (a database server, not a local file)."""
        return self.queue_url is not None

    @property
    def watched_disks(self) -> list[Path]:
        """Where the API writes what it accepts: the files directory (with object storage,
        the data directory, where upload bodies are spooled), and the data directory when it
        holds the queue (SQLite)."""
        if self.storage_url:
            return [self.data_dir]
        return [self.files_dir] if self.shared_queue else [self.files_dir, self.data_dir]

    @property
    def upload_spool_dir(self) -> Path:
        """With object storage: where the API receives an upload's body before sending it."""
        return self.data_dir / "upload-spool"

    @property
    def lora_cache_path(self) -> Path:
        return self.lora_cache_dir or self.data_dir / "lora-cache"

    @property
    def run_dir(self) -> Path:
        """Sockets used to wake processes (short paths: AF_UNIX limits them to ~100 bytes)."""
        return self.data_dir / "run"

    @property
    def keys_path(self) -> Path:
        """The keys file to read and watch (server/tenants/keys.py): --api-keys-file, else
        <data_dir>/keys.json (used when it exists)."""
        return self.api_keys_file or self.data_dir / "keys.json"

    @property
    def request_body_limit(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return self.max_input_image_bytes * 4 // 3 + 1024 * 1024

    def prompt_too_long(self, prompt: str | None) -> str | None:
        """The message for a prompt over the limit, or None when it fits."""
        if prompt is not None and len(prompt) > self.max_prompt_length:
            return (
                f"The prompt is {len(prompt)} characters long; at most {self.max_prompt_length} are accepted"
            )
        return None

    def is_trusted_proxy(self, address: str | None) -> bool:
        if not address or not self.trusted_proxy:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(item, strict=False) for item in self.trusted_proxy)

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str | None) -> str | None:
        if value and not value.startswith("s3://"):
            raise ValueError(f"{value!r}: object storage is given as s3://bucket/prefix")
        return value or None

    @field_validator("trusted_proxy")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)  # ValueError names the bad entry
        return value

    def host_is_loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def to_env(self) -> dict[str, str]:
        """The settings as FLUX_* variables, for child processes."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, dict):
                value = json.dumps(value)
            elif isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"FLUX_{name.upper()}"] = str(value)
        return env
