"""fal's routes in the OpenAPI document, one path per app and endpoint of the app table.

fal's routes are path patterns (`/{owner}/{app}/{endpoint}`), which would document nothing
useful, so they are left out of FastAPI's own schema and described here from the endpoint
table (endpoints.py): for every endpoint its submit, sync run and stream with the endpoint's
input schema, and for every app its status, status stream, result and cancel; then the same
for each configured fine-tune under its own owner (`mystyle/flux/dev`). An endpoint added to
the table appears without touching this module. Operation ids are stable:
`fal_<kind>_<path slug>`. Each submit operation says which checkpoint runs it
(`x-flux-variant`) and whether this server serves it (`x-flux-variant-served`; the playground
leaves out those it does not).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from server.api.protocols.fal import endpoints
from server.api.protocols.fal.endpoints import FAL_OWNER, Endpoint
from server.api.protocols.fal.models import FalOutput
from server.config import Settings
from server.jobs import BASE_VARIANT
from server.variant_names import fine_tunes, served_variants

REF = "#/components/schemas/{model}"
SECURITY = [{"FalKey": []}]


class FalQueueStatus(BaseModel):
    """Submit's answer and the status route's body (also each status-stream event)."""

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None = Field(default=None, description="While IN_QUEUE: requests ahead")
    logs: list[dict[str, Any]] | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    error: str | None = Field(default=None, description="COMPLETED with an error: its message")
    error_type: str | None = None


class FalCancelAnswer(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]


class FalError(BaseModel):
    """An error body: `detail` is a message, or a list of validation errors (422)."""

    detail: str | list[dict[str, Any]]
    error_type: str | None = None


def slug(path: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", path).strip("_")


def _json(ref: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _errors(refs: dict[str, str], *codes: int) -> dict[str, Any]:
    meaning = {
        400: "Still in progress, or already completed (cancel)",
        401: "Missing or invalid API key",
        404: "Unknown app, endpoint or request; or the endpoint's checkpoint is not configured",
        413: "Request body over the server's limit",
        422: "Invalid input (fal's validation-error list)",
    }
    return {str(code): _json(refs["FalError"], meaning[code]) for code in codes}


def fal_openapi(settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """(paths, component schemas) for every fal app and endpoint, and every configured fine-tune."""
    inputs = {spec.input_model for table in endpoints.APPS.values() for spec in table.values()}
    answers = [FalOutput, FalQueueStatus, FalCancelAnswer, FalError]
    models = [*sorted(inputs, key=lambda m: m.__name__), *answers]
    keyed, definitions = models_json_schema([(model, "validation") for model in models], ref_template=REF)
    refs = {model.__name__: keyed[(model, "validation")]["$ref"] for model in models}
    served = served_variants(settings)
    paths: dict[str, Any] = {}
    for app_id, table in endpoints.APPS.items():
        for endpoint, spec in table.items():
            paths.update(_endpoint_paths(refs, app_id, endpoint, spec, spec.variant, served))
        paths.update(_request_paths(refs, app_id))
    for name in fine_tunes(settings):
        for app_id, table in endpoints.APPS.items():
            tunable = {endpoint: spec for endpoint, spec in table.items() if spec.variant == BASE_VARIANT}
            if not tunable:
                continue
            own_app = f"{name}/{app_id.removeprefix(FAL_OWNER + '/')}"
            for endpoint, spec in tunable.items():
                paths.update(_endpoint_paths(refs, own_app, endpoint, spec, name, served))
            paths.update(_request_paths(refs, own_app))
    return paths, definitions.get("$defs", {})


def _endpoint_paths(
    refs: dict[str, str], app_id: str, endpoint: str, spec: Endpoint, variant: str, served: frozenset[str]
) -> dict[str, Any]:
    """Submit, sync run and stream of one endpoint."""
    path_id = f"{app_id}/{endpoint}" if endpoint else app_id  # "": the app itself
    schema = {"$ref": refs[spec.input_model.__name__]}
    body = {"required": True, "content": {"application/json": {"schema": schema}}}
    tags = [f"fal {app_id}"]
    event_stream = {"description": "text/event-stream", "content": {"text/event-stream": {}}}
    paths: dict[str, Any] = {}
    for path, kind, summary, answer in (
        (f"/{path_id}", "submit", f"Queue a {spec.task} request ({path_id})",
         _json(refs["FalQueueStatus"], "Queued: request id, queue position, URLs")),
        (f"/run/{path_id}", "run", f"Run {path_id} and wait for the output (sync)",
         _json(refs["FalOutput"], "The output")),
        (f"/run/{path_id}/stream", "stream",
         f"Run {path_id}: progress events, then the output (server-sent events)", event_stream),
    ):  # fmt: skip
        paths[path] = {
            "post": {
                "operationId": f"fal_{kind}_{slug(path_id)}",
                "summary": summary,
                "description": f"Runs on the '{variant}' checkpoint"
                + ("." if variant in served else ", which this server does not serve (404)."),
                "tags": tags,
                "requestBody": body,
                "responses": {"200": answer, **_errors(refs, 401, 404, 413, 422)},
                "security": SECURITY,
                "x-flux-variant": variant,
                "x-flux-variant-served": variant in served,
            }
        }
    return paths


def _request_paths(refs: dict[str, str], app_id: str) -> dict[str, Any]:
    """Status, status stream, result and cancel of an app's requests."""
    request_id = {"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}
    logs = {"name": "logs", "in": "query", "required": False, "schema": {"type": "boolean"}}
    base = f"/{app_id}/requests/{{request_id}}"
    app_slug = slug(app_id)
    tags = [f"fal {app_id}"]
    paths: dict[str, Any] = {}
    paths[f"{base}/status"] = {
        "get": {
            "operationId": f"fal_status_{app_slug}",
            "summary": "Status of a queued request",
            "tags": tags,
            "parameters": [request_id, logs],
            "responses": {
                "200": _json(refs["FalQueueStatus"], "COMPLETED"),
                "202": _json(refs["FalQueueStatus"], "IN_QUEUE or IN_PROGRESS"),
                **_errors(refs, 401, 404),
            },
            "security": SECURITY,
        }
    }
    paths[f"{base}/status/stream"] = {
        "get": {
            "operationId": f"fal_status_stream_{app_slug}",
            "summary": "Status changes as server-sent events, until COMPLETED",
            "tags": tags,
            "parameters": [request_id, logs],
            "responses": {
                "200": {"description": "text/event-stream", "content": {"text/event-stream": {}}},
                **_errors(refs, 401, 404),
            },
            "security": SECURITY,
        }
    }
    paths[base] = {
        "get": {
            "operationId": f"fal_result_{app_slug}",
            "summary": "The output of a completed request (or its error)",
            "tags": tags,
            "parameters": [request_id],
            "responses": {"200": _json(refs["FalOutput"], "The output"), **_errors(refs, 400, 401, 404)},
            "security": SECURITY,
        }
    }
    paths[f"{base}/cancel"] = {
        "put": {
            "operationId": f"fal_cancel_{app_slug}",
            "summary": "Cancel a request (queued: at once; running: at its next step)",
            "tags": tags,
            "parameters": [request_id],
            "responses": {
                "202": _json(refs["FalCancelAnswer"], "CANCELLATION_REQUESTED"),
                "400": _json(refs["FalCancelAnswer"], "ALREADY_COMPLETED"),
                "404": _json(refs["FalCancelAnswer"], "NOT_FOUND"),
            },
            "security": SECURITY,
        }
    }
    return paths
