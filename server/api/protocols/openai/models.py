"""OpenAI's images API wire format (as spoken by LocalAI / vLLM-style servers).

Unknown fields are ignored (the SDK grows new ones: background, moderation, ...); `quality`,
`style` and `user` are accepted and ignored; `seed`, `steps`, `guidance` and `strength` are
extensions (pass them with the SDK's `extra_body=`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.jobs import SEED_LIMIT, OutputFormat

DEFAULT_MODEL_ID = "flux.1-dev"
DEFAULT_SIZE = (1024, 1024)
# The `model` names that choose a family member (any case, with or without the
# "black-forest-labs/" prefix); the first of each is the id /v1/models lists. A configured
# fine-tune is chosen by its own name. Any other name runs the base model, as it always did.
FAMILY_MODEL_IDS: dict[str, tuple[str, ...]] = {
    "kontext": ("flux.1-kontext-dev", "flux-kontext-dev", "flux.1-kontext", "flux-kontext", "kontext"),
    "krea": ("flux.1-krea-dev", "flux-krea-dev", "flux.1-krea", "flux-krea", "krea"),
}

ResponseFormat = Literal["url", "b64_json"]


class ImageFields(BaseModel):
    """The fields generations and edits share."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1)
    model: str | None = DEFAULT_MODEL_ID
    n: int = Field(default=1, ge=1, le=4)
    size: str | None = "auto"
    response_format: ResponseFormat | None = "url"
    output_format: OutputFormat | None = "png"
    # Extensions
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    steps: int | None = Field(default=None, ge=1, le=50)
    guidance: float | None = Field(default=None, ge=0, le=20)


class ImageGenerationRequest(ImageFields):
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class ImageEditFields(ImageFields):
    """The non-file fields of the multipart edits request, validated like a JSON body."""

    strength: float = Field(default=0.85, gt=0, le=1)


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "flux-server"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
