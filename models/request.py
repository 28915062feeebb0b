"""What the runtime is asked to generate, and the one error that is the request's fault.

The runtime knows nothing about protocols or the server's `Job`: the server maps a job onto a
`GenerationRequest` (server/worker.py) with a concrete seed, since the server is the one place
seeds are drawn. This module imports no torch.

Errors: `InputError` (and its subclass `TaskUnavailable`) means the request itself cannot be
run as given (a size the pipelines would silently change, an input image that does not
decode, a task whose parts are not loaded); the server answers it with a 4xx. Anything else
raised while generating, a ValueError from inside diffusers or torchao included, is the
server's own failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from models.lora.spec import LoraSpec

# "fill" (FLUX.1 Fill [dev]), "edit" and "edit-inpainting" (FLUX.1 Kontext [dev]) run on
# their variants; the others on any text-to-image variant (the base, Krea, fine-tunes).
Task = Literal["text-to-image", "image-to-image", "inpainting", "redux", "fill", "edit", "edit-inpainting"]
PresetName = Literal["none", "regular", "high"]
BASE_VARIANT = "dev"
# Tasks whose output size follows the input image (models/variants/sizes.py), not width/height.
SIZED_BY_INPUT = ("fill", "edit", "edit-inpainting")
RESOLUTION_MODES = (
    "auto",
    "match_input",
    "1:1",
    "16:9",
    "21:9",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "3:4",
    "4:3",
    "9:16",
    "9:21",
)

# Sanity limits. The protocol adapters check their own (narrower) limits first; the runtime
# refuses anything outside these instead of passing it to diffusers.
MAX_STEPS = 50
MAX_GUIDANCE = 20.0
MAX_FILL_GUIDANCE = 50.0  # FLUX.1 Fill [dev] runs at guidance 30 (fal: 28-35)
MAX_IMAGES = 4
# FLUX sizes are multiples of 16 (the VAE's 8x downscale times the transformer's 2x2 patches).
SIZE_MULTIPLE = 16
MIN_SIDE = 64
MAX_SIDE = 2048
SEED_LIMIT = 2**64  # torch's generator takes any unsigned 64-bit seed


class InputError(Exception):
    """The request cannot run as given; the message is meant for the client."""


class TaskUnavailable(InputError):
    """The request asks for a task whose parts are not loaded (redux without the redux folder)."""


class VariantUnavailable(TaskUnavailable):
    """The request names a variant (checkpoint) this worker does not serve; the message names
    it and the setting that adds it."""

    def __init__(self, variant: str, reason: str) -> None:
        super().__init__(reason)
        self.variant = variant


@dataclass(frozen=True)
class GenerationRequest:
    """One call of the runtime: `num_images` images of `width` x `height` from one seed."""

    prompt: str
    width: int
    height: int
    seed: int
    task: Task = "text-to-image"
    steps: int = 28
    guidance: float = 3.5
    num_images: int = 1
    strength: float = 0.95  # image-to-image and inpainting: the share of the steps that run
    # Input image for image-to-image, inpainting and redux, as encoded bytes (any format PIL reads).
    image: bytes | None = None
    mask: bytes | None = None  # inpainting, fill, edit-inpainting: white is repainted, black kept
    reference_image: bytes | None = None  # edit-inpainting: what Kontext paints into the mask
    loras: tuple[LoraSpec, ...] = ()  # local LoRA files and their scales, for this call only
    variant: str = BASE_VARIANT  # the checkpoint: "dev" (the base), "fill", "kontext", "krea", a fine-tune
    resolution_mode: str = "match_input"  # edit: the output size (models/variants/sizes.py)
    paste_back: bool = True  # fill: the input's pixels outside the mask pasted over the output
    resize_to_original: bool = False  # fill: the output resized to the input's exact size
    acceleration: PresetName = "none"
    enable_safety_checker: bool = True
    # BFL's 0 (strict) .. 6 (permissive); None: the checker's default threshold.
    safety_tolerance: int | None = None


def size_problem(width: int, height: int) -> str | None:
    """Why the runtime cannot make a `width` x `height` image as is, or None."""
    for name, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            return f"{name} {value} is outside {MIN_SIDE}..{MAX_SIDE}"
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        nearest = "x".join(str(int(v / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE) for v in (width, height))
        return (
            f"size {width}x{height} is not a multiple of {SIZE_MULTIPLE}; "
            f"round it first (nearest valid size: {nearest})"
        )
    return None


def validate(request: GenerationRequest) -> None:
    """Refuse values the pipelines would silently change or crash on (InputError). The tasks in
    SIZED_BY_INPUT make the size their input gives, so width/height are not checked."""
    max_guidance = MAX_FILL_GUIDANCE if request.task == "fill" else MAX_GUIDANCE
    problems = [
        None if request.task in SIZED_BY_INPUT else size_problem(request.width, request.height),
        None if 0 <= request.seed < SEED_LIMIT else f"seed must be in [0, 2^64), got {request.seed}",
        None
        if 1 <= request.steps <= MAX_STEPS
        else f"num_inference_steps must be between 1 and {MAX_STEPS}, got {request.steps}",
        None
        if math.isfinite(request.guidance) and 0 <= request.guidance <= max_guidance
        else f"guidance_scale must be between 0 and {max_guidance:g}, got {request.guidance}",
        None
        if 1 <= request.num_images <= MAX_IMAGES
        else f"num_images must be between 1 and {MAX_IMAGES}, got {request.num_images}",
    ]
    if request.task != "text-to-image" and not request.image:
        problems.append(f"task {request.task!r} needs an input image")
    if request.task in ("inpainting", "fill", "edit-inpainting") and not request.mask:
        problems.append(f"task {request.task!r} needs a mask")
    if request.task == "edit-inpainting" and not request.reference_image:
        problems.append("task 'edit-inpainting' needs a reference image")
    if request.task == "edit" and request.resolution_mode not in RESOLUTION_MODES:
        problems.append(
            f"resolution_mode must be one of {', '.join(RESOLUTION_MODES)}, got {request.resolution_mode!r}"
        )
    if request.task in ("image-to-image", "inpainting", "edit-inpainting") and not (
        math.isfinite(request.strength) and 0 < request.strength <= 1
    ):
        problems.append(f"strength must be in (0, 1], got {request.strength}")
    if request.safety_tolerance is not None and not 0 <= request.safety_tolerance <= 6:
        problems.append(f"safety_tolerance must be between 0 and 6, got {request.safety_tolerance}")
    found = [p for p in problems if p]
    if found:
        raise InputError("; ".join(found))


def runs_with_strength(task: str) -> bool:
    """The tasks that start from the noised input and run only `strength` of the steps."""
    return task in ("image-to-image", "inpainting", "edit-inpainting")


def img2img_steps(steps: int, strength: float) -> int:
    """The steps FluxImg2ImgPipeline actually runs (its get_timesteps arithmetic): the `n` that
    on_step reports; at least 1 for any strength > 0."""
    return steps - int(max(steps - min(steps * strength, steps), 0))
