"""fal wire format <-> the protocol-free Job / JobRecord.

Inbound: `build_job` validates a request body for one endpoint and maps it to a `Job`.
Outbound: `submit_body`, `status_body`, `output_body` and `error_parts` render a `JobRecord`
in fal's shapes (docs/api/fal.md). Webhook delivery renders with the same
functions, so a payload and a result route can never disagree.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.api.protocols.fal.endpoints import Route
from server.api.protocols.fal.models import FalImage, FalOutput, LoraFields, validation_error
from server.api.protocols.fal.task_inputs import task_inputs
from server.api.webhooks.policy import validate_webhook_url
from server.config import Settings
from server.jobs import (
    Job,
    JobError,
    JobRecord,
    JobResult,
    LoraRef,
    Priority,
    Status,
    Webhook,
)
from server.storage import Storage, image_url


def pydantic_errors(exc: ValidationError, prefix: str = "body") -> list[dict[str, Any]]:
    """pydantic's errors, located under `prefix` and safe to serialise as JSON."""
    errors = []
    for error in exc.errors(include_url=False):
        entry: dict[str, Any] = {
            "loc": [prefix, *error["loc"]],
            "msg": error["msg"],
            "type": error["type"],
        }
        value = error.get("input")
        # Echo small scalar inputs only: a body-level error would otherwise echo the whole
        # request, data-URI images included.
        if isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= 200):
            entry["input"] = value
        if "ctx" in error:
            entry["ctx"] = {
                key: v if isinstance(v, (int, float, bool, str)) or v is None else str(v)
                for key, v in error["ctx"].items()
            }
        errors.append(entry)
    return errors


def parse_body(raw: bytes) -> Any:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestValidationError(
            [validation_error(["body"], f"Invalid JSON body: {exc}", "json_invalid")]
        ) from None


def parse_priority(value: str | None) -> Priority:
    if value is None or not value.strip():
        return "normal"
    lowered = value.strip().lower()
    if lowered not in ("normal", "low"):
        raise RequestValidationError(
            [validation_error(["header", "x-fal-queue-priority"], "must be 'normal' or 'low'", "enum")]
        )
    return lowered  # type: ignore[return-value]


def parse_start_deadline(value: str | None, now: float) -> float | None:
    """X-Fal-Request-Timeout: seconds (a float string) the request may wait to be started."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise RequestValidationError(
            [
                validation_error(
                    ["header", "x-fal-request-timeout"],
                    "must be a positive number of seconds",
                    "float_parsing",
                )
            ]
        )
    return now + seconds


def parse_webhook(url: str | None, settings: Settings) -> Webhook | None:
    """`?fal_webhook=`: an http(s) URL, on the allow-list when one is configured."""
    if url is None:
        return None
    try:
        checked = validate_webhook_url(url, settings)
    except ValueError as exc:
        raise RequestValidationError(
            [validation_error(["query", "fal_webhook"], str(exc), "url_parsing")]
        ) from None
    return Webhook(url=checked, kind="fal")


# Job fields that only some wire models have (image-to-image's strength, Kontext's
# resolution_mode, Fill's paste_back and resize_to_original).
TASK_FIELDS = ("strength", "resolution_mode", "paste_back", "resize_to_original")


async def build_job(
    *,
    route: Route,
    body: Any,
    settings: Settings,
    base_url: str,
    priority: Priority = "normal",
    start_deadline: float | None = None,
    webhook: Webhook | None = None,
    storage: Storage | None = None,
    output_url_seconds: float | None = None,
) -> Job:
    """Validate `body` for the endpoint of `route` and map it to a Job on the route's variant.
    Raises RequestValidationError."""
    spec = route.spec
    try:
        data = spec.input_model.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(pydantic_errors(exc)) from None
    too_long = settings.prompt_too_long(getattr(data, "prompt", None))
    if too_long:
        raise RequestValidationError([validation_error(["body", "prompt"], too_long, "string_too_long")])
    loras = lora_refs(data, settings) if isinstance(data, LoraFields) else ()
    # Each input is shrunk at submit to the size the model resizes it to (task_inputs.py).
    inputs = await task_inputs(spec.task, data, settings=settings, storage=storage, base_url=base_url)
    # The task-specific fields a schema has; the others keep the Job's defaults. (Looked up in
    # the class's fields: `hasattr` on a pydantic model raises and catches for each missing one.)
    fields = type(data).model_fields
    extras = {name: getattr(data, name) for name in TASK_FIELDS if name in fields}
    return Job(
        task=spec.task,
        prompt=getattr(data, "prompt", "") if spec.task != "redux" else "",
        width=inputs.width,
        height=inputs.height,
        num_inference_steps=data.num_inference_steps,
        guidance_scale=data.guidance_scale,
        seed=data.seed,
        num_images=data.num_images,
        image=inputs.image,
        mask=inputs.mask,
        reference_image=inputs.reference_image,
        loras=loras,
        variant=route.variant,
        output_format=data.output_format,
        acceleration=data.acceleration or settings.default_acceleration or spec.default_acceleration,
        enable_safety_checker=data.enable_safety_checker,
        inline_images=data.sync_mode,
        protocol="fal",
        app_id=route.app_id,
        endpoint=route.endpoint,
        priority=priority,
        start_deadline=start_deadline,
        webhook=webhook,
        output_url_seconds=output_url_seconds,
        base_url=base_url,
        **extras,
    )


def lora_refs(data: LoraFields, settings: Settings) -> tuple[LoraRef, ...]:
    """The request's LoRAs, at most `lora_max_per_request` of them (more: a 422)."""
    limit = settings.lora_max_per_request
    if len(data.loras) > limit:
        raise RequestValidationError(
            [
                validation_error(
                    ["body", "loras"],
                    f"At most {limit} LoRAs per request on this server, got {len(data.loras)}",
                    "too_long",
                    ctx={"max_length": limit},
                )
            ]
        )
    return tuple(LoraRef(path=lora.path, scale=lora.scale) for lora in data.loras)


# --- rendering ------------------------------------------------------------------------------


def request_urls(base_url: str, app_id: str, request_id: str) -> dict[str, str]:
    response_url = f"{base_url}/{app_id}/requests/{request_id}"
    return {
        "response_url": response_url,
        "status_url": response_url + "/status",
        "cancel_url": response_url + "/cancel",
    }


def submit_body(record: JobRecord, base_url: str, position: int | None) -> dict[str, Any]:
    return {
        "status": record.status.value,
        "request_id": record.id,
        "gateway_request_id": record.id,
        **request_urls(base_url, record.job.app_id, record.id),
        "queue_position": position or 0,
        "logs": None,
        "metrics": {},
    }


def status_body(record: JobRecord, base_url: str, *, with_logs: bool, position: int | None) -> dict[str, Any]:
    """The status route's body; also each event of the status stream."""
    body: dict[str, Any] = {
        "status": record.status.value,
        "request_id": record.id,
        **request_urls(base_url, record.job.app_id, record.id),
    }
    if record.status is Status.IN_QUEUE:
        body["queue_position"] = position or 0
    # fal_client reads data["logs"] in every state but IN_QUEUE; JS sample code maps over it.
    body["logs"] = [entry.model_dump() for entry in record.logs] if with_logs else []
    body["metrics"] = {}
    if record.status is Status.COMPLETED:
        inference = inference_seconds(record)
        if inference is not None:
            body["metrics"] = {"inference_time": inference}
        if record.error is not None:
            body["error"] = record.error.message
            body["error_type"] = record.error.error_type
    return body


def inference_seconds(record: JobRecord) -> float | None:
    if record.result is not None and "inference" in record.result.timings:
        return record.result.timings["inference"]
    if record.started_at is not None and record.completed_at is not None:
        return max(0.0, record.completed_at - record.started_at)
    return None


def output_body(result: JobResult, base_url: str) -> dict[str, Any]:
    """The raw model output (docs/api/fal.md): what the result route and sync run return."""
    images = [
        FalImage(
            url=image_url(base_url, image),
            width=image.width,
            height=image.height,
            content_type=image.content_type,
            file_name=image.file_name,
            file_size=image.file_size,
        )
        for image in result.images
    ]
    output = FalOutput(
        images=images,
        timings=result.timings,
        seed=result.seed,
        has_nsfw_concepts=result.has_nsfw_concepts,
        prompt=result.prompt,
        acceleration=result.preset,
        acceleration_note=result.preset_note,
    )
    return output.model_dump(exclude_none=True)


def error_parts(error: JobError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status code, body and headers for a failed job (result route, sync run)."""
    body = error.body if error.body is not None else {"detail": error.message, "error_type": error.error_type}
    headers = {"x-fal-error-type": error.error_type}
    status_code = error.status_code
    if error.error_type == "request_timeout":
        # fal's start-timeout answer: both clients stop retrying on this header.
        status_code = 504
        headers["x-fal-request-timeout-type"] = "user"
    return status_code, body, headers
