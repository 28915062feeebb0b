"""fal's wire models for the rest of the FLUX.1 [dev] family: Kontext, Fill and Krea.

Field names and defaults are fal's (`libs/client/src/types/endpoints.ts` in fal-ai/fal-js:
`DevKontextEditInput`, `BaseKontextEditInput`, `BaseKontextInput`, `BaseKontextInpaintInput`,
`FluxLoraFillInput`; the Krea endpoints reuse `FluxDevInput`, `BaseImageToInput`,
`BaseReduxInput` and the flux-lora inputs). Ranges are fal's published ones where its model
pages give them (Krea: guidance 4.5, 1-20; Kontext: steps 10-50; Fill: guidance 30, 28-35), else
the shared ones of models.py. Each endpoint's row in endpoints.py names the model, the task and
the checkpoint (variant) it runs on.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from server.api.protocols.fal.models import (
    FalInput,
    FalOutputFormat,
    FluxDevInput,
    FluxImageToImageInput,
    FluxReduxInput,
    ImageSize,
    ImageSizePreset,
    LoraFields,
    SizedInput,
    checked_image_size,
)
from server.jobs import IMAGE_SIZE_PRESETS, Acceleration, ResolutionMode

KREA_GUIDANCE = 4.5
KONTEXT_GUIDANCE = 2.5
FILL_GUIDANCE = 30.0

# --- Krea: FLUX.1 Krea [dev] under flux/dev's schemas, with Krea's guidance -----------------


class KreaInput(FluxDevInput):
    """`fal-ai/flux/krea` and `fal-ai/flux-1/krea`."""

    guidance_scale: float = Field(default=KREA_GUIDANCE, ge=1, le=20)


class KreaImageToImageInput(FluxImageToImageInput):
    """`.../krea/image-to-image`: the output follows the input image's size."""

    guidance_scale: float = Field(default=KREA_GUIDANCE, ge=1, le=20)


class KreaReduxInput(FluxReduxInput):
    """`.../krea/redux`."""

    guidance_scale: float = Field(default=KREA_GUIDANCE, ge=1, le=20)


# --- Kontext: FLUX.1 Kontext [dev] ------------------------------------------------------------


class KontextFields(BaseModel):
    """What every Kontext endpoint shares: its steps range (10-50) and guidance (2.5)."""

    num_inference_steps: int = Field(default=28, ge=10, le=50)
    guidance_scale: float = Field(default=KONTEXT_GUIDANCE, ge=1, le=20)


class KontextEditInput(KontextFields, FalInput):
    """`fal-ai/flux-kontext/dev`: edits `image_url` as the prompt says."""

    prompt: str
    image_url: str
    resolution_mode: ResolutionMode = Field(
        default="match_input",
        description="match_input: the input's size (rounded to 16, within the bounds); auto: the "
        "preferred Kontext resolution nearest the input's aspect ratio; a ratio: that ratio at about 1 MP",
    )


class KontextLoraFields(LoraFields):
    """fal-ai/flux-kontext-lora: LoRAs, 30 steps, PNG, and every acceleration (unlike flux-lora)."""

    num_inference_steps: int = Field(default=30, ge=10, le=50)
    guidance_scale: float = Field(default=KONTEXT_GUIDANCE, ge=0, le=20)
    output_format: FalOutputFormat = "png"
    acceleration: Acceleration | None = None


class KontextLoraEditInput(KontextLoraFields, KontextEditInput):
    """`fal-ai/flux-kontext-lora`: Kontext's edit with LoRAs."""


class KontextLoraTextToImageInput(KontextLoraFields, SizedInput):
    """`fal-ai/flux-kontext-lora/text-to-image`: Kontext generating from the prompt alone."""

    prompt: str


class KontextLoraInpaintInput(KontextLoraFields, FalInput):
    """`fal-ai/flux-kontext-lora/inpaint`: repaints the mask's white area of `image_url`,
    guided by `reference_image_url`; the output has the input's size."""

    prompt: str
    image_url: str
    mask_url: str
    reference_image_url: str
    strength: float = Field(default=0.88, ge=0.01, le=1)


# --- Fill: FLUX.1 Fill [dev] ------------------------------------------------------------------


class FillInput(LoraFields, FalInput):
    """`fal-ai/flux-lora-fill`: in- and outpainting. The output has the input's size unless
    `image_size` is given; `resize_to_original` brings it back to the input's exact size."""

    prompt: str = ""
    image_url: str
    mask_url: str
    image_size: ImageSizePreset | ImageSize | None = Field(
        default=None, description="The output size; the input image's size (rounded to 16) when omitted"
    )
    guidance_scale: float = Field(default=FILL_GUIDANCE, ge=28, le=35)
    paste_back: bool = Field(default=True, description="Paste the input's unmasked pixels over the output")
    resize_to_original: bool = Field(default=False, description="Resize the output to the input's exact size")
    fill_image: dict[str, Any] | None = Field(default=None, description="Not supported by this server")

    @field_validator("image_size", mode="wrap")
    @classmethod
    def _check_image_size(cls, value: Any, handler: Any) -> ImageSizePreset | ImageSize | None:
        return None if value is None else checked_image_size(value, handler, tuple(IMAGE_SIZE_PRESETS))

    @field_validator("fill_image")
    @classmethod
    def _no_fill_image(cls, value: dict[str, Any] | None) -> None:
        if value is not None:
            raise ValueError("fill_image (Redux fill) is not supported by this server; leave it out")
        return None
