"""BFL <-> Job: `FluxDevInputs` to a `Job`, a `JobRecord` to BFL's result and webhook bodies."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from server.api.protocols.bfl.models import BflStatus, FluxDevInputs, ResultResponse
from server.jobs import Acceleration, Job, JobRecord, Status, Webhook
from server.storage import image_url

APP_ID = "bfl/flux-dev"
# error_type a worker or adapter can give a job that was refused because of its prompt.
REQUEST_MODERATED_ERROR_TYPES = frozenset({"content_policy_violation"})


def inputs_to_job(
    inputs: FluxDevInputs,
    *,
    base_url: str,
    image_png: bytes | None,
    default_acceleration: Acceleration | None = None,
) -> Job:
    """BFL's API has no preset field: the operator's `--default-acceleration`, else "none"."""
    webhook = None
    if inputs.webhook_url:
        webhook = Webhook(url=inputs.webhook_url, kind="bfl", secret=inputs.webhook_secret or None)
    return Job(
        # image_prompt makes it a Redux job: the image conditions the generation, prompt optional.
        task="redux" if image_png is not None else "text-to-image",
        prompt=inputs.prompt or "",
        width=inputs.width,
        height=inputs.height,
        num_inference_steps=inputs.steps if inputs.steps is not None else 28,
        guidance_scale=inputs.guidance if inputs.guidance is not None else 3.0,
        seed=inputs.seed,  # None: the Job draws one
        image=image_png,
        output_format=inputs.output_format or "jpeg",
        enable_safety_checker=True,
        safety_tolerance=inputs.safety_tolerance,
        acceleration=default_acceleration or "none",
        protocol="bfl",
        app_id=APP_ID,
        endpoint="flux-dev",
        webhook=webhook,
        base_url=base_url,
    )


def polling_url(base_url: str, request_id: str) -> str:
    return f"{base_url}/v1/get_result?id={request_id}"


def bfl_status(record: JobRecord | None) -> BflStatus:
    if record is None:
        return BflStatus.TASK_NOT_FOUND
    if record.status is not Status.COMPLETED:
        return BflStatus.PENDING
    if record.error is not None:
        if record.error.error_type in REQUEST_MODERATED_ERROR_TYPES:
            return BflStatus.REQUEST_MODERATED
        return BflStatus.ERROR
    if record.result is not None and any(record.result.has_nsfw_concepts):
        return BflStatus.CONTENT_MODERATED
    return BflStatus.READY


def _result_body(record: JobRecord) -> dict[str, Any]:
    assert record.result is not None
    image = record.result.images[0]
    start = record.started_at or record.created_at
    end = record.completed_at or start
    return {
        "sample": image_url(record.job.base_url, image),
        "seed": record.result.seed,
        "prompt": record.result.prompt,
        "start_time": start,
        "end_time": end,
        "duration": round(end - start, 3),
    }


def _details(record: JobRecord, status: BflStatus) -> dict[str, Any] | None:
    if status in (BflStatus.ERROR, BflStatus.REQUEST_MODERATED) and record.error is not None:
        return {"error_type": record.error.error_type, "message": record.error.message}
    if status is BflStatus.CONTENT_MODERATED:
        return {
            "moderation": "The generated image was flagged by the safety checker",
            "safety_tolerance": record.job.safety_tolerance,
        }
    if status is BflStatus.READY and record.result is not None:
        details: dict[str, Any] = {"safety": "checked" if record.result.nsfw_checked else "unchecked"}
        if not record.result.nsfw_checked:
            details["safety_note"] = "No safety checker is configured on this server; nothing was moderated"
        if record.result.preset_note:
            details["preset_note"] = record.result.preset_note
        return details
    return None


def record_to_result(record: JobRecord | None, request_id: str) -> ResultResponse:
    status = bfl_status(record)
    if record is None:
        return ResultResponse(id=request_id, status=status)
    progress = 1.0 if record.status is Status.COMPLETED else record.progress
    result = _result_body(record) if status is BflStatus.READY else None
    return ResultResponse(
        id=record.id,
        status=status,
        result=result,
        progress=round(progress, 4),
        details=_details(record, status),
    )


def webhook_payload(record: JobRecord, now: datetime | None = None) -> dict[str, Any]:
    """The body POSTed to `webhook_url` when the job finishes."""
    status = bfl_status(record)
    timestamp = (now or datetime.now(timezone.utc)).isoformat()
    body: dict[str, Any] = {"id": record.id, "status": status.value, "timestamp": timestamp}
    if status is BflStatus.READY:
        body["result"] = _result_body(record)
    else:
        body["result"] = None
        details = _details(record, status)
        if details is not None:
            body["details"] = details
        if record.error is not None:
            body["error"] = record.error.error_type
            body["message"] = record.error.message
    return body
