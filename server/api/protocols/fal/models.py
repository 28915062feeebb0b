"""fal's wire models for FLUX.1 [dev] (protocols reference §9), as pydantic models.

These are fal's public schemas: `FluxDevInput` (text-to-image), `FluxImageToImageInput`
(`BaseImageToInput` in fal's JS types) and `FluxReduxInput` (`BaseReduxInput`). Unknown fields
are ignored, as fal's own FastAPI apps do. The output models document the response shape that
`adapter.py` renders.

The aggregator path `fal-ai/flux-1/dev` (and its sub-paths) is documented by API aggregators
that allow more spellings than fal does: `acceleration: "default"`, `output_format: "default"`
or `"JPEG"` in any case, and `image_size` as an aspect ratio (`"3:4"`, ...). The `Aggregator*`
models accept those and map each onto the value it stands for, so a job never sees them; fal's
own paths stay as strict as fal.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.jobs import IMAGE_SIZE_PRESETS, SEED_LIMIT, Acceleration, round_size

ImageSizePreset = Literal[
    "square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"
]
# fal's output formats: a subset of the server's OutputFormat.
FalOutputFormat = Literal["jpeg", "png"]

# The aggregator pages' `image_size` range, as the presets they stand for.
ASPECT_RATIO_PRESETS: dict[str, ImageSizePreset] = {
    "3:4": "portrait_4_3",
    "4:3": "landscape_4_3",
    "16:9": "landscape_16_9",
    "9:16": "portrait_16_9",
}
# The aggregator's word for "whatever the path does when the field is left out".
DEFAULT_WORD = "default"


class ImageSize(BaseModel):
    # fal's toolkit: each side > 0 and <= 14142, 512 when omitted; our bounds apply after.
    width: int = Field(default=512, gt=0, le=14142)
    height: int = Field(default=512, gt=0, le=14142)


def resolve_image_size(value: ImageSizePreset | ImageSize) -> tuple[int, int]:
    """Pixels for a preset or an explicit size, rounded to what the model can generate."""
    if isinstance(value, str):
        return IMAGE_SIZE_PRESETS[value]
    return round_size(value.width, value.height)


class FalInput(BaseModel):
    """Fields shared by every FLUX.1 [dev] endpoint."""

    model_config = ConfigDict(extra="ignore")

    num_inference_steps: int = Field(default=28, ge=1, le=50)
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT, description="Random when omitted")
    guidance_scale: float = Field(default=3.5, ge=1, le=20)
    sync_mode: bool = Field(default=False, description="Return images as data URIs; store nothing")
    num_images: int = Field(default=1, ge=1, le=4)
    enable_safety_checker: bool = True
    output_format: FalOutputFormat = "jpeg"
    acceleration: Acceleration | None = Field(
        default=None, description="The path's default (or the operator's --default-acceleration) when omitted"
    )


class SizedInput(FalInput):
    image_size: ImageSizePreset | ImageSize = "landscape_4_3"
    # The names the error message offers (the aggregator adds its aspect ratios).
    image_size_names: ClassVar[tuple[str, ...]] = tuple(IMAGE_SIZE_PRESETS)

    @field_validator("image_size", mode="wrap")
    @classmethod
    def _check_image_size(cls, value: Any, handler: Any) -> ImageSizePreset | ImageSize:
        return checked_image_size(value, handler, cls.image_size_names)


def checked_image_size(value: Any, handler: Any, names: tuple[str, ...]) -> ImageSizePreset | ImageSize:
    """An `image_size` wrap validator's work: one clear message instead of one error per member
    of the union, and the size's bounds checked."""
    try:
        size = handler(value)
    except ValidationError:
        presets = ", ".join(names)
        raise ValueError(
            f"image_size must be one of {presets} or an object {{width, height}} of positive integers"
        ) from None
    resolve_image_size(size)  # raises ValueError for sizes out of bounds
    return size


class FluxDevInput(SizedInput):
    """`fal-ai/flux/dev` and `fal-ai/flux-1/dev`."""

    prompt: str


class FluxImageToImageInput(FalInput):
    """`.../dev/image-to-image`: no image_size, the output follows the input image's size."""

    prompt: str
    image_url: str
    strength: float = Field(default=0.95, ge=0.01, le=1)
    num_inference_steps: int = Field(default=40, ge=10, le=50)


class FluxReduxInput(SizedInput):
    """`.../dev/redux`: no prompt in fal's schema; one sent anyway is accepted and ignored."""

    image_url: str


# --- fal-ai/flux-lora and its sub-paths ------------------------------------------------------

LoraAcceleration = Literal["none", "regular"]


class LoraWeight(BaseModel):
    """One LoRA: a URL, a name in the server's LoRA folder, or a Hugging Face repo id."""

    model_config = ConfigDict(extra="ignore")

    path: str = Field(min_length=1, max_length=2048)
    scale: float = Field(default=1.0, ge=-4, le=4)
    force: bool = False  # fal: re-download; here every URL is fetched once per cache entry


class LoraFields(BaseModel):
    """What fal-ai/flux-lora adds to the flux/dev fields (its acceleration has no "high")."""

    loras: list[LoraWeight] = Field(default_factory=list, description="Merged, each with its own scale")
    acceleration: LoraAcceleration | None = None


class FluxLoraInput(LoraFields, FluxDevInput):
    """`fal-ai/flux-lora`."""


class FluxLoraImageToImageInput(LoraFields, FalInput):
    """`fal-ai/flux-lora/image-to-image`: the output follows the input image's size."""

    prompt: str
    image_url: str
    strength: float = Field(default=0.85, ge=0.01, le=1)


class FluxLoraInpaintingInput(FluxLoraImageToImageInput):
    """`fal-ai/flux-lora/inpainting`: white in the mask is repainted, black kept."""

    mask_url: str


# --- the aggregator path: fal-ai/flux-1/dev and its sub-paths -------------------------------


class AggregatorValues(BaseModel):
    """The aggregator's extra spellings, mapped onto fal's values before fal's validation."""

    image_size_names: ClassVar[tuple[str, ...]] = (*IMAGE_SIZE_PRESETS, *ASPECT_RATIO_PRESETS)

    @field_validator("output_format", mode="before", check_fields=False)
    @classmethod
    def _output_format(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return "jpeg" if value == DEFAULT_WORD else value  # the documented default
        return value

    @field_validator("acceleration", mode="before", check_fields=False)
    @classmethod
    def _acceleration(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return None if value == DEFAULT_WORD else value  # None: the path's default
        return value

    @field_validator("image_size", mode="before", check_fields=False)
    @classmethod
    def _image_size(cls, value: Any) -> Any:
        if isinstance(value, str):
            return ASPECT_RATIO_PRESETS.get(value.strip(), value)
        return value


class AggregatorDevInput(AggregatorValues, FluxDevInput):
    """`fal-ai/flux-1/dev`."""


class AggregatorImageToImageInput(AggregatorValues, FluxImageToImageInput):
    """`fal-ai/flux-1/dev/image-to-image`."""


class AggregatorReduxInput(AggregatorValues, FluxReduxInput):
    """`fal-ai/flux-1/dev/redux`."""


# --- errors and output ---------------------------------------------------------------------

ERRORS_URL = "https://docs.fal.ai/errors/#"


def validation_error(loc: list[str | int], message: str, error_type: str, **extra: Any) -> dict[str, Any]:
    """One entry of fal's 422 `detail` list."""
    return {"loc": loc, "msg": message, "type": error_type, "url": ERRORS_URL + error_type, **extra}


class FalImage(BaseModel):
    url: str
    width: int
    height: int
    content_type: str
    file_name: str | None = None
    file_size: int | None = None


class FalOutput(BaseModel):
    """The raw model output that the result route, sync run and webhooks return (§9.2).

    `acceleration` is an extension: the preset that actually ran (clients ignore extra keys)."""

    images: list[FalImage]
    timings: dict[str, float]
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str
    acceleration: str | None = None
    acceleration_note: str | None = None
