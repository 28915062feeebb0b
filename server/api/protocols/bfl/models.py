"""BFL's wire format for FLUX.1 [dev] (`api.bfl.ai`): `FluxDevInputs` and the response bodies.

Field names, defaults and bounds follow BFL's OpenAPI; the pydantic models are also this
server's OpenAPI schema for the BFL routes.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.jobs import SEED_LIMIT, OutputFormat

SIDE_MULTIPLE = 32


class BflStatus(str, Enum):
    """BFL's six status strings; clients compare them literally."""

    TASK_NOT_FOUND = "Task not found"
    PENDING = "Pending"
    REQUEST_MODERATED = "Request Moderated"
    CONTENT_MODERATED = "Content Moderated"
    READY = "Ready"
    ERROR = "Error"


class FluxDevInputs(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(default="", description="Text prompt.")
    image_prompt: str | None = Field(
        default=None, description="Base64-encoded image (or data: URI) for Redux-style prompting."
    )
    width: int = Field(default=1024, ge=256, le=1440, description="Multiple of 32.")
    height: int = Field(default=768, ge=256, le=1440, description="Multiple of 32.")
    steps: int | None = Field(default=28, ge=1, le=50)
    prompt_upsampling: bool = Field(default=False, description="Accepted; not applied by this server.")
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    guidance: float | None = Field(default=3.0, ge=1.5, le=5)
    safety_tolerance: int = Field(default=2, ge=0, le=6, description="0 (strict) .. 6 (permissive).")
    output_format: OutputFormat | None = "jpeg"
    webhook_url: str | None = Field(default=None, min_length=1, max_length=2083)
    webhook_secret: str | None = None

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % SIDE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIDE_MULTIPLE}")
        return value

    @model_validator(mode="after")
    def _prompt_or_image(self) -> FluxDevInputs:
        if not (self.prompt or "").strip() and not self.image_prompt:
            raise ValueError("at least one of prompt or image_prompt is required")
        return self


class AsyncResponse(BaseModel):
    id: str
    polling_url: str
    cost: float | None = None
    input_mp: float | None = None
    output_mp: float | None = None


class AsyncWebhookResponse(BaseModel):
    id: str
    status: str
    webhook_url: str
    polling_url: str  # not in BFL's schema; harmless extra that lets a client poll as well
    cost: float | None = None
    input_mp: float | None = None
    output_mp: float | None = None


class ResultResponse(BaseModel):
    id: str
    status: BflStatus
    result: dict[str, Any] | None = None
    progress: float | None = None
    details: dict[str, Any] | None = None
    preview: dict[str, Any] | None = None
