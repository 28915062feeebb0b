"""OpenAI images <-> Job: sizes, request mapping, responses and OpenAI-shaped errors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from server.api.protocols.openai.models import (
    DEFAULT_MODEL_ID,
    DEFAULT_SIZE,
    FAMILY_MODEL_IDS,
    ImageData,
    ImageEditFields,
    ImageGenerationRequest,
    ImagesResponse,
    Model,
    ModelList,
)
from server.api.variants import VariantNotServed
from server.config import Settings
from server.jobs import (
    BASE_VARIANT,
    Acceleration,
    Job,
    JobError,
    JobRecord,
    ResolutionMode,
    Task,
    parse_wxh,
    round_size,
)
from server.storage import image_url
from server.variant_names import fine_tunes, served_variants

APP_ID = "openai/images"
DEFAULT_STEPS = 28
DEFAULT_GUIDANCE = 3.5
# A checkpoint's own default guidance where it is not FLUX.1 [dev]'s (fal's Kontext and Krea pages).
VARIANT_GUIDANCE = {"kontext": 2.5, "krea": 4.5}
EDIT_AUTO_MAX_SIDE = 1024  # "auto" edit size: the input's, scaled down to this longest side


class OpenAIError(Exception):
    """An error answered as `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers  # e.g. Retry-After on a 429
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def parse_size(size: str | None) -> tuple[int, int]:
    """ "WxH" (rounded to a multiple of 16 within the server's bounds) or "auto"/None -> default."""
    if size is None or size.strip().lower() in ("", "auto"):
        return DEFAULT_SIZE
    try:
        return round_size(*parse_wxh(size))
    except ValueError as exc:
        raise OpenAIError(400, f"Invalid size {size!r}: {exc}", param="size") from None


def edit_size(size: str | None, input_width: int, input_height: int) -> tuple[int, int]:
    if size is not None and size.strip().lower() not in ("", "auto"):
        return parse_size(size)
    scale = min(1.0, EDIT_AUTO_MAX_SIDE / max(input_width, input_height))
    try:
        return round_size(max(64, round(input_width * scale)), max(64, round(input_height * scale)))
    except ValueError:
        return DEFAULT_SIZE


def model_variant(model: str | None, settings: Settings) -> str:
    """The checkpoint a request's `model` names: Kontext or Krea by their ids, a fine-tune by
    its name, anything else the base model. Raises VariantNotServed (answered 404
    `model_not_found`) for a family member this server does not serve."""
    name = (model or "").strip()
    lowered = name.lower().removeprefix("black-forest-labs/")
    variant = next((v for v, ids in FAMILY_MODEL_IDS.items() if lowered in ids), None)
    if variant is None:
        return name if name in fine_tunes(settings) else BASE_VARIANT
    if variant not in served_variants(settings):
        raise VariantNotServed(variant, f"The model '{name}'")
    return variant


def variant_error(exc: VariantNotServed) -> OpenAIError:
    return OpenAIError(404, exc.message, param="model", code="model_not_found")


def build_job(
    fields: ImageGenerationRequest | ImageEditFields,
    *,
    size: tuple[int, int],
    base_url: str,
    task: Task = "text-to-image",
    variant: str = BASE_VARIANT,
    image: bytes | None = None,
    strength: float = 0.95,
    resolution_mode: ResolutionMode = "match_input",
    default_acceleration: Acceleration | None = None,
) -> Job:
    """OpenAI's API has no preset field: the operator's `--default-acceleration`, else "none"."""
    guidance = VARIANT_GUIDANCE.get(variant, DEFAULT_GUIDANCE)
    return Job(
        task=task,
        variant=variant,
        resolution_mode=resolution_mode,
        prompt=fields.prompt,
        width=size[0],
        height=size[1],
        num_inference_steps=fields.steps or DEFAULT_STEPS,
        guidance_scale=fields.guidance if fields.guidance is not None else guidance,
        seed=fields.seed,
        num_images=fields.n,
        strength=strength,
        image=image,
        output_format=fields.output_format or "png",
        acceleration=default_acceleration or "none",
        # b64_json needs the bytes, not a file: nothing is stored.
        inline_images=fields.response_format == "b64_json",
        protocol="openai",
        app_id=APP_ID,
        endpoint="images/generations" if task == "text-to-image" else "images/edits",
        base_url=base_url,
    )


def job_error(error: JobError) -> OpenAIError:
    """A failed job in OpenAI's terms: the client's fault (4xx) or ours (5xx)."""
    if 400 <= error.status_code < 500 and error.error_type not in ("request_timeout", "request_cancelled"):
        return OpenAIError(400, error.message, code=error.error_type)
    status = 503 if error.status_code in (503, 504) else 500
    return OpenAIError(status, error.message, error_type="server_error", code=error.error_type)


def images_response(record: JobRecord) -> ImagesResponse:
    assert record.result is not None
    data = []
    for image in record.result.images:
        if image.data_uri:
            data.append(ImageData(b64_json=image.data_uri.partition(",")[2]))
        else:
            data.append(ImageData(url=image_url(record.job.base_url, image)))
    return ImagesResponse(
        created=int(record.completed_at or time.time()),
        data=data,
        output_format=record.job.output_format,
        size=f"{record.job.width}x{record.job.height}",
    )


def served_model_ids(settings: Settings) -> list[str]:
    """The ids /v1/models lists: the canonical one, the configured weights' name, then Kontext
    and Krea when they are served, then each fine-tune by its name."""
    ids = [DEFAULT_MODEL_ID]
    name = Path(settings.model).name or settings.model
    served = served_variants(settings)
    for model_id in (
        name,
        *(ids_[0] for variant, ids_ in FAMILY_MODEL_IDS.items() if variant in served),
        *fine_tunes(settings),
    ):
        if model_id and model_id not in ids:
            ids.append(model_id)
    return ids


def model_list(settings: Settings, created: int) -> ModelList:
    return ModelList(data=[Model(id=model_id, created=created) for model_id in served_model_ids(settings)])
