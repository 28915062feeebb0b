"""A claimed job as the runtime's request, and the errors a job can end with."""

from __future__ import annotations

from models.lora.spec import LoraSpec
from models.request import GenerationRequest
from server.jobs import Job, JobError, parse_wxh


def generation_request(job: Job, loras: tuple[LoraSpec, ...] = ()) -> GenerationRequest:
    """The runtime's request for `job`: what to generate, none of the routing metadata.
    `Job.seed` is always concrete (server.jobs draws one when a client sent none). `loras`:
    the job's LoRAs, already resolved to local files (server.worker.lora)."""
    return GenerationRequest(
        prompt=job.prompt,
        width=job.width,
        height=job.height,
        seed=job.seed,
        task=job.task,
        steps=job.num_inference_steps,
        guidance=job.guidance_scale,
        num_images=job.num_images,
        strength=job.strength,
        image=job.image,
        mask=job.mask,
        reference_image=job.reference_image,
        loras=loras,
        variant=job.variant,
        resolution_mode=job.resolution_mode,
        paste_back=job.paste_back,
        resize_to_original=job.resize_to_original,
        acceleration=job.acceleration,
        enable_safety_checker=job.enable_safety_checker,
        safety_tolerance=job.safety_tolerance,
    )


def input_error(message: str) -> JobError:
    """The client's fault (bad size, undecodable image, task not loaded): a fal-style 422."""
    return JobError(
        message=message,
        error_type="validation_error",
        status_code=422,
        body={"detail": [{"loc": ["body"], "msg": message, "type": "value_error"}]},
    )


def internal_error(message: str, status_code: int = 500) -> JobError:
    """The server's own failure, with a message meant for the client (no exception text)."""
    return JobError(message=message, error_type="internal_server_error", status_code=status_code)


def unexpected_error(request_id: str) -> JobError:
    """An unexpected failure as the client sees it. Exception text may carry paths, memory
    figures and other internals, so it stays in the worker's log (logged with the job's id,
    which this message names) and never reaches the client."""
    return internal_error(
        f"Internal error while running request {request_id}; the server log has the details under that id"
    )


def parse_sizes(items: list[str]) -> list[tuple[int, int]]:
    return [parse_wxh(item) for item in items]
