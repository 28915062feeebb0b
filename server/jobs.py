"""The one job model every protocol maps to, and what the queue keeps about it.

A protocol adapter (fal, BFL, OpenAI) validates its own wire format, then builds a `Job`.
The worker knows nothing about protocols: it turns a `Job` into a `JobResult`. The adapter
renders the finished `JobRecord` back into its own response shape.

This module imports no torch: the API process and the worker both use it.
"""

from __future__ import annotations

import secrets
import time
import uuid
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# "fill": FLUX.1 Fill [dev] repaints the mask's white area (image + mask); "edit": FLUX.1
# Kontext [dev] edits `image` by the prompt; "edit-inpainting": Kontext repaints the mask's area
# of `image`, guided by `reference_image`. Every other task runs on any text-to-image variant.
Task = Literal["text-to-image", "image-to-image", "inpainting", "redux", "fill", "edit", "edit-inpainting"]
# The checkpoint a job runs on: the base `--model` ("dev"), the fixed family members, or an
# operator's fine-tune under a name of its own (server/config.py `variants`).
BASE_VARIANT = "dev"
FAMILY_VARIANTS = ("fill", "kontext", "krea")
# Kontext's output size: "match_input" keeps the input's size (rounded to 16), "auto" picks the
# nearest of diffusers' preferred Kontext resolutions, a ratio picks that ratio at about 1 MP.
ResolutionMode = Literal[
    "auto", "match_input", "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"
]
# The one output-format type: every protocol's format names map onto these three.
OutputFormat = Literal["jpeg", "png", "webp"]
Acceleration = Literal["none", "regular", "high"]
Priority = Literal["normal", "low"]
Protocol = Literal["fal", "bfl", "openai", "cli"]

# Seeds the server draws stay below 2^53, where JavaScript numbers are still exact; seeds a
# client sends may use torch's whole 64-bit generator range (fal's docs show seeds near 1.6e19).
MAX_SEED = 2**53
SEED_LIMIT = 2**64

# Pixel bounds for any generated image. Sizes are rounded to a multiple of 16 (the VAE's 8x
# downscale times the transformer's 2x2 patches) before they are checked against these.
MIN_SIDE = 64
MAX_SIDE = 2048
MAX_PIXELS = 2048 * 2048
SIZE_MULTIPLE = 16

# Redux's input size: FLUX.1 Redux encodes its image with SigLIP so400m at 384x384 px (its
# feature_extractor resizes to that). Kept here, not read from models/, because the API
# process, which shrinks Redux images to it at submit (server/api/inputs.py), never imports models/.
REDUX_INPUT_SIDE = 384

CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

# fal's `image_size` presets (width, height), from the fal toolkit.
IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


def parse_wxh(text: str) -> tuple[int, int]:
    """`"1024x768"` (any case, spaces around the numbers allowed) -> (1024, 768), not rounded.

    Raises ValueError with a message meant for whoever wrote the text.
    """
    width, sep, height = text.strip().lower().partition("x")
    width, height = width.strip(), height.strip()
    if not sep or not width.isdigit() or not height.isdigit():
        raise ValueError(f"{text!r} is not of the form WIDTHxHEIGHT (e.g. 1024x768)")
    return int(width), int(height)


def round_size(width: int, height: int) -> tuple[int, int]:
    """Round a requested size to the nearest multiple of 16 and check it against the bounds.

    Raises ValueError with a message meant for the client.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    w = max(SIZE_MULTIPLE, int(width / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)
    h = max(SIZE_MULTIPLE, int(height / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)
    for name, value in (("width", w), ("height", h)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise ValueError(
                f"{name} {value} (after rounding to a multiple of {SIZE_MULTIPLE}) is outside "
                f"{MIN_SIDE}..{MAX_SIDE}"
            )
    if w * h > MAX_PIXELS:
        raise ValueError(f"{w}x{h} has more than {MAX_PIXELS} pixels")
    return w, h


def new_request_id() -> str:
    return str(uuid.uuid4())


def draw_seed() -> int:
    """A random seed for a request that sent none. Only `Job` calls it: a job always carries a
    concrete seed, so a retried job repeats its image and the response can echo the seed."""
    return secrets.randbelow(MAX_SEED)


class Status(str, Enum):
    """The three states fal's clients understand; failures and cancels end as COMPLETED."""

    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"


class Webhook(BaseModel):
    """Where to POST the outcome, and how to sign it (fal: Ed25519; BFL: HMAC with secret)."""

    url: str
    kind: Literal["fal", "bfl"]
    secret: str | None = None


class LoraRef(BaseModel):
    """One LoRA of a job, as the client named it (URL, name in --lora-dir, HF repo id); the
    worker resolves it to a local file."""

    model_config = ConfigDict(frozen=True)

    path: str
    scale: float = 1.0


class Job(BaseModel):
    """A request to generate images, independent of the protocol it arrived on."""

    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    # What to generate
    task: Task = "text-to-image"
    prompt: str = ""
    width: int
    height: int
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    # None (the client sent no seed) is replaced by a drawn one: this is where seeds are drawn.
    seed: int = Field(default_factory=draw_seed, ge=0, lt=SEED_LIMIT)
    num_images: int = Field(default=1, ge=1, le=4)
    strength: float = 0.95  # image-to-image and inpainting
    # Input image for image-to-image, inpainting and redux: downloaded, decoded, shrunk to what
    # the model uses, re-encoded as PNG. Stored apart from the job's JSON; only the Job a
    # worker claims carries it (server/queue/records.py), never one the API reads back.
    image: bytes | None = None
    mask: bytes | None = None  # inpainting and fill: white = repaint, black = keep (PNG, like `image`)
    reference_image: bytes | None = None  # edit-inpainting: Kontext's reference (PNG, like `image`)
    loras: tuple[LoraRef, ...] = ()  # applied for this job only
    variant: str = BASE_VARIANT  # the checkpoint: "dev", "fill", "kontext", "krea" or a fine-tune
    resolution_mode: ResolutionMode = "match_input"  # edit only
    paste_back: bool = True  # fill: the unmasked pixels of the input are pasted over the output
    resize_to_original: bool = False  # fill: the output is resized to the input's size
    output_format: OutputFormat = "jpeg"
    acceleration: Acceleration = "none"
    enable_safety_checker: bool = True
    # BFL's 0 (strict) .. 6 (permissive); None means the fal behaviour (flag at the default threshold).
    safety_tolerance: int | None = None
    # True: images come back inline as data URIs and no file is stored (fal's sync_mode).
    inline_images: bool = False

    # Routing metadata: never read by the runtime
    protocol: Protocol = "fal"
    app_id: str = "fal-ai/flux"  # owner/app: fal's status and result URLs use only this
    endpoint: str = "dev"  # the subpath it was submitted on
    priority: Priority = "normal"
    # The tenant (API key name) that submitted it; None: no named key (one shared tenant).
    # Claims share the workers fairly between tenants (server/queue/fairshare.py).
    tenant: str | None = None
    start_deadline: float | None = None  # unix time; not started by then -> request_timeout
    webhook: Webhook | None = None
    # How long the URLs of its output images stay valid (fal's lifecycle preference on the
    # submit), capped by the retention time; None: the retention time.
    output_url_seconds: float | None = None
    # Scheme://host[:port] the client used (or --public-url): returned URLs and webhook
    # payloads are built on it, also when rendered later by another process.
    base_url: str = "http://127.0.0.1:8000"

    @field_validator("seed", mode="before")
    @classmethod
    def _draw_missing_seed(cls, value: object) -> object:
        return draw_seed() if value is None else value


class OutputImage(BaseModel):
    """One generated image: stored under the data directory (`file_name`) or inline (`data_uri`)."""

    width: int
    height: int
    content_type: str
    file_name: str | None = None
    data_uri: str | None = None
    file_size: int
    # Where clients read it when not on this server's files route: a presigned or public
    # object-storage URL (server/storage/s3.py), valid as long as the result is kept.
    url: str | None = None
    # When its URLs stop working, if sooner than the result's deletion (the submit's lifecycle
    # preference, Job.output_url_seconds): signed file URLs on this server expire then.
    url_expires_at: float | None = None


class JobResult(BaseModel):
    """What the worker produced for a successful job."""

    images: list[OutputImage]
    seed: int
    prompt: str
    has_nsfw_concepts: list[bool]
    # False when no safety checker ran (none configured or disabled by the request): the flags
    # above are then all False and mean "not checked", never "checked and clean".
    nsfw_checked: bool
    timings: dict[str, float]  # seconds: "inference" (fal's key), "encode", "denoise", "decode", ...
    preset: str  # the acceleration preset that actually ran
    preset_note: str | None = None  # why it differs from the one asked for


class JobError(BaseModel):
    """A failed job. fal reports it as COMPLETED with error/error_type; the result route
    answers with `status_code` and `body`."""

    message: str
    error_type: str
    status_code: int = 500
    body: dict | None = None  # e.g. a 422 {"detail": [...]}; default {"detail": message}


# The errors the queue itself produces. error_type strings follow fal's documented names.
def cancelled_error() -> JobError:
    return JobError(message="Request was cancelled", error_type="request_cancelled", status_code=400)


def start_timeout_error() -> JobError:
    # fal answers 504 with X-Fal-Request-Timeout-Type: user; clients then stop retrying.
    return JobError(
        message="Request was not started before its X-Fal-Request-Timeout",
        error_type="request_timeout",
        status_code=504,
    )


def disconnected_error() -> JobError:
    return JobError(
        message="The worker running this request stopped twice; giving up",
        error_type="runner_disconnected",
        status_code=503,
    )


class LogEntry(BaseModel):
    message: str
    level: str = "INFO"
    source: str = "USER"
    timestamp: str
    labels: dict[str, str] = Field(default_factory=dict)


class JobRecord(BaseModel):
    """Everything the queue knows about one request."""

    id: str
    job: Job
    status: Status
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    cancel_requested: bool = False
    progress: float = 0.0  # 0..1, the share of denoising steps done
    logs: list[LogEntry] = Field(default_factory=list)
    result: JobResult | None = None
    error: JobError | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is Status.COMPLETED and self.result is not None
