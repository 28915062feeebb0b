"""OpenAI's images API: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`.

`model` chooses the checkpoint (adapter.model_variant): `flux.1-kontext-dev` makes an edit a
Kontext edit (the prompt says what to change; `size` "auto" is Kontext's own auto resolution),
`flux.1-krea-dev` runs Krea, a fine-tune's name runs the fine-tune; any other name runs the
base model, as before. A family member the server does not serve is a 404 `model_not_found`.

These calls are synchronous for the client, but the work goes through the same queue and
workers as every other protocol: submit, wait for the record to complete, answer. A client
that hangs up cancels its job (server/api/waiting.py says why). Every error is `{"error":
{message, type, param, code}}`, rendered by `OpenAIRoute` whatever handlers the app installs elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api.auth import KeyProblem, api_key_dependency
from server.api.deps import get_queue, get_settings, public_base_url
from server.api.errors import INSUFFICIENT_STORAGE, log_unhandled, register_error_renderer
from server.api.idempotency import IdempotencyKeyRefused
from server.api.inputs import FitRule, InputImage, InputImageError, decode, target_fit
from server.api.output_sizes import conditioning_fit, kontext_size
from server.api.protocols.openai import adapter
from server.api.protocols.openai.adapter import OpenAIError
from server.api.protocols.openai.models import (
    ImageEditFields,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
)
from server.api.tenancy import TOO_MANY_REQUESTS
from server.api.variants import VariantNotServed
from server.api.waiting import ClientGone, submit_and_wait
from server.jobs import Job, JobRecord

logger = logging.getLogger(__name__)
PATH_PREFIXES = ("/v1/images", "/v1/models")


def _param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    parts = [str(part) for part in loc if part not in ("body", "query", "form")]
    return ".".join(parts) or None


def _validation_error(errors: list[Any]) -> OpenAIError:
    first = errors[0] if errors else {}
    param = _param(first.get("loc", ()))
    message = str(first.get("msg", "Invalid request"))
    if param:
        message = f"Invalid value for '{param}': {message}"
    return OpenAIError(400, message, param=param, code="invalid_value")


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


class OpenAIRoute(APIRoute):
    """Renders this router's errors in OpenAI's shape, independent of app-level handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return error_response(exc)
            except VariantNotServed as exc:
                return error_response(adapter.variant_error(exc))
            except IdempotencyKeyRefused as exc:  # a 422, as on the other protocols
                return error_response(OpenAIError(422, exc.message, code=exc.error_type))
            except RequestValidationError as exc:
                return error_response(_validation_error(list(exc.errors())))
            except HTTPException as exc:
                return error_response(http_error(exc))

        return openai_handler


def http_error(exc: StarletteHTTPException) -> OpenAIError:
    """An HTTP error in OpenAI's shape: the server's own trouble (a full disk, the queue
    unavailable) is a `server_error`, anything else the request's."""
    if exc.status_code == TOO_MANY_REQUESTS:  # a tenant's quota (server/api/tenancy.py)
        return OpenAIError(
            exc.status_code,
            str(exc.detail),
            error_type="requests",
            code="rate_limit_exceeded",
            headers=exc.headers,
        )
    if exc.status_code < 500:
        return OpenAIError(exc.status_code, str(exc.detail))
    code = "insufficient_storage" if exc.status_code == INSUFFICIENT_STORAGE else None
    return OpenAIError(exc.status_code, str(exc.detail), error_type="server_error", code=code)


async def render_error(request: Request, exc: Exception) -> Response:
    """App-level renderer for errors outside the routes (404/405, unexpected exceptions)."""
    if isinstance(exc, OpenAIError):
        return error_response(exc)
    if isinstance(exc, RequestValidationError):
        return error_response(_validation_error(list(exc.errors())))
    if isinstance(exc, StarletteHTTPException):
        return error_response(http_error(exc))
    log_unhandled(logger, request, exc)
    return error_response(OpenAIError(500, "Internal server error", error_type="server_error"))


def setup(app: FastAPI) -> None:
    for prefix in PATH_PREFIXES:
        register_error_renderer(app, prefix, render_error)


def refuse_key(problem: KeyProblem) -> OpenAIError:
    if problem is KeyProblem.MISSING:
        message = "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
    else:
        message = "Incorrect API key provided."
    return OpenAIError(401, message, code="invalid_api_key")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorBody, "description": "Invalid request (prompt too long included)"},
    401: {"model": OpenAIErrorBody, "description": "Missing or invalid API key"},
    413: {"model": OpenAIErrorBody, "description": "Request body over the server's limit"},
    500: {"model": OpenAIErrorBody, "description": "The generation failed"},
}
router = APIRouter(
    route_class=OpenAIRoute,
    dependencies=[Depends(api_key_dependency(refuse_key))],
    tags=["OpenAI"],
    responses=ERROR_RESPONSES,
)


async def run_job(request: Request, job: Job) -> JobRecord:
    """Submit and wait until the job completes; a client that hangs up cancels it."""
    try:
        return await submit_and_wait(request, get_queue(request), job)
    except ClientGone:
        raise OpenAIError(499, "Client closed the request", code="client_closed_request") from None


def _answer(record: JobRecord) -> JSONResponse:
    if record.error is not None or record.result is None:
        if record.error is None:
            raise OpenAIError(500, "The job finished without a result", error_type="server_error")
        raise adapter.job_error(record.error)
    body: ImagesResponse = adapter.images_response(record)
    return JSONResponse(body.model_dump(exclude_none=True))


@router.post(
    "/v1/images/generations",
    operation_id="openai_create_image",
    response_model=ImagesResponse,
    summary="Create images (OpenAI API)",
)
async def generations(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    check_prompt(request, body.prompt)
    settings = get_settings(request)
    variant = adapter.model_variant(body.model, settings)
    size = adapter.parse_size(body.size)
    job = adapter.build_job(
        body,
        size=size,
        base_url=public_base_url(request),
        variant=variant,
        default_acceleration=settings.default_acceleration,
    )
    return _answer(await run_job(request, job))


def check_prompt(request: Request, prompt: str) -> None:
    """The server's prompt-length limit, as OpenAI reports a string over its maximum."""
    too_long = get_settings(request).prompt_too_long(prompt)
    if too_long:
        raise OpenAIError(400, too_long, param="prompt", code="string_above_max_length")


async def _read_image(form_value: Any, max_bytes: int, fit: FitRule, threads: int | None) -> InputImage:
    if not isinstance(form_value, UploadFile):
        raise OpenAIError(400, "'image' must be an uploaded file (multipart/form-data)", param="image")
    data = await form_value.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OpenAIError(400, f"The image is larger than {max_bytes} bytes", param="image")
    try:
        return await decode(data, fit, threads=threads)
    except InputImageError as exc:
        raise OpenAIError(400, exc.message, param="image", code=exc.error_type) from None


def _edit_fit(size: str | None, kontext: bool) -> FitRule:
    """The input is shrunk at submit to the output size (which "auto" derives from the input's
    size, as its header gives it); Kontext's to at most the ~1 MP it conditions on, its aspect
    ratio kept. A bad explicit size is refused before the image is read."""
    explicit = size is not None and size.strip().lower() not in ("", "auto")
    if explicit:
        output = adapter.parse_size(size)
    if kontext:
        return conditioning_fit
    if explicit:
        return target_fit(*output)
    return lambda width, height: target_fit(*adapter.edit_size(None, width, height))


def _kontext_size(size: str | None, image: InputImage) -> tuple[int, int]:
    """A Kontext edit's output: an explicit size, else Kontext's "auto" (the preferred
    resolution nearest the input's aspect ratio)."""
    if size is not None and size.strip().lower() not in ("", "auto"):
        return adapter.parse_size(size)
    return kontext_size("auto", image.source_width, image.source_height)


@router.post(
    "/v1/images/edits",
    operation_id="openai_edit_image",
    response_model=ImagesResponse,
    summary="Edit an image (image-to-image)",
)
async def edits(request: Request) -> JSONResponse:
    settings = get_settings(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIError(400, "Send the edit as multipart/form-data with an 'image' file and a 'prompt'")
    form = await request.form()
    try:
        images = form.getlist("image") or form.getlist("image[]")
        if not images:
            raise OpenAIError(
                400, "Missing required parameter: 'image'", param="image", code="missing_required_parameter"
            )
        fields_in = {key: value for key, value in form.multi_items() if isinstance(value, str)}
        try:
            fields = ImageEditFields.model_validate(fields_in)
        except ValidationError as exc:
            raise _validation_error(list(exc.errors())) from None
        check_prompt(request, fields.prompt)
        variant = adapter.model_variant(fields.model, settings)
        kontext = variant == "kontext"
        # Several images (the gpt-image-1 form) make sense only for models that combine them;
        # FLUX image-to-image and Kontext take one, so the first is used.
        image = await _read_image(
            images[0],
            settings.max_input_image_bytes,
            _edit_fit(fields.size, kontext),
            settings.input_decode_threads,
        )
    finally:
        await form.close()
    if kontext:
        # Kontext edits by the prompt alone: no strength. "auto" conditions on Kontext's
        # preferred resolution; the output is `size` (or that resolution).
        job = adapter.build_job(
            fields,
            size=_kontext_size(fields.size, image),
            base_url=public_base_url(request),
            task="edit",
            variant=variant,
            image=image.png,
            resolution_mode="auto",
            default_acceleration=settings.default_acceleration,
        )
    else:
        job = adapter.build_job(
            fields,
            size=adapter.edit_size(fields.size, image.source_width, image.source_height),
            base_url=public_base_url(request),
            task="image-to-image",
            variant=variant,
            image=image.png,
            strength=fields.strength,
            default_acceleration=settings.default_acceleration,
        )
    return _answer(await run_job(request, job))


@router.get(
    "/v1/models", operation_id="openai_list_models", response_model=ModelList, summary="List the served model"
)
async def list_models(request: Request) -> JSONResponse:
    models = adapter.model_list(get_settings(request), _started(request))
    return JSONResponse(models.model_dump())


@router.get("/v1/models/{model_id}", operation_id="openai_get_model", summary="Describe the served model")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    for model in adapter.model_list(get_settings(request), _started(request)).data:
        if model.id == model_id:
            return JSONResponse(model.model_dump())
    raise OpenAIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")


def _started(request: Request) -> int:
    state = request.app.state
    if not hasattr(state, "openai_models_created"):
        state.openai_models_created = int(time.time())
    return state.openai_models_created
