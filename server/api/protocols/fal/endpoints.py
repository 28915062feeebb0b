"""fal's endpoint table: app id -> endpoint (the sub-path) -> wire model, task and checkpoint.

Adding an endpoint of the FLUX.1 [dev] family is a row here and, when its fields differ, a
schema in models.py or family_models.py: the queue, sync run, stream, JS proxy, webhooks,
OpenAPI document and playground all read this table. The adapter maps any row's validated body
onto a Job by the task (which inputs it takes) and the variant (which checkpoint runs it).

Fine-tunes: an app id whose owner is not `fal-ai` names a fine-tune (`--variant NAME=PATH`)
and runs the same app's endpoints on it: `mystyle/flux/dev`, `mystyle/flux-1/dev/redux` and
`mystyle/flux-lora/inpainting` take the schemas and defaults of fal-ai/flux/dev,
fal-ai/flux-1/dev/redux and fal-ai/flux-lora/inpainting, on the checkpoint "mystyle". Only the
endpoints that run on the base model (variant "dev") can be run on a fine-tune; the Fill,
Kontext and Krea endpoints name their own checkpoint. Status, result and cancel live under
`/mystyle/flux/requests/{id}` as fal's clients expect (owner/app of the id they submitted to).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.api.protocols.fal.family_models import (
    FillInput,
    KontextEditInput,
    KontextLoraEditInput,
    KontextLoraInpaintInput,
    KontextLoraTextToImageInput,
    KreaImageToImageInput,
    KreaInput,
    KreaReduxInput,
)
from server.api.protocols.fal.models import (
    AggregatorDevInput,
    AggregatorImageToImageInput,
    AggregatorReduxInput,
    FalInput,
    FluxDevInput,
    FluxImageToImageInput,
    FluxLoraImageToImageInput,
    FluxLoraInpaintingInput,
    FluxLoraInput,
    FluxReduxInput,
)
from server.jobs import BASE_VARIANT, Acceleration, Task
from server.variant_names import fine_tune_name_problem

FAL_OWNER = "fal-ai"


@dataclass(frozen=True)
class Endpoint:
    input_model: type[FalInput]
    task: Task
    # The checkpoint: the base `--model` ("dev"), "fill", "kontext" or "krea".
    variant: str = BASE_VARIANT
    # What `acceleration` means when the request leaves it out (or, on the aggregator path,
    # says "default"): the path's own document's default, unless the operator set one.
    default_acceleration: Acceleration = "none"


# fal's own app documents "none" as flux/dev's default acceleration; the aggregator page for
# fal-ai/flux-1/dev documents "regular" (its sub-paths are documented only by fal: "none").
# "" is an app served at its own id (`POST /fal-ai/flux-lora`).
APPS: dict[str, dict[str, Endpoint]] = {
    "fal-ai/flux": {
        "dev": Endpoint(FluxDevInput, "text-to-image"),
        "dev/image-to-image": Endpoint(FluxImageToImageInput, "image-to-image"),
        "dev/redux": Endpoint(FluxReduxInput, "redux"),
        "krea": Endpoint(KreaInput, "text-to-image", "krea"),
        "krea/image-to-image": Endpoint(KreaImageToImageInput, "image-to-image", "krea"),
        "krea/redux": Endpoint(KreaReduxInput, "redux", "krea"),
    },
    "fal-ai/flux-1": {
        "dev": Endpoint(AggregatorDevInput, "text-to-image", default_acceleration="regular"),
        "dev/image-to-image": Endpoint(AggregatorImageToImageInput, "image-to-image"),
        "dev/redux": Endpoint(AggregatorReduxInput, "redux"),
        "krea": Endpoint(KreaInput, "text-to-image", "krea"),
        "krea/image-to-image": Endpoint(KreaImageToImageInput, "image-to-image", "krea"),
        "krea/redux": Endpoint(KreaReduxInput, "redux", "krea"),
    },
    "fal-ai/flux-lora": {
        "": Endpoint(FluxLoraInput, "text-to-image"),
        "image-to-image": Endpoint(FluxLoraImageToImageInput, "image-to-image"),
        "inpainting": Endpoint(FluxLoraInpaintingInput, "inpainting"),
    },
    "fal-ai/flux-krea-lora": {
        "": Endpoint(FluxLoraInput, "text-to-image", "krea"),
        "image-to-image": Endpoint(FluxLoraImageToImageInput, "image-to-image", "krea"),
        "inpainting": Endpoint(FluxLoraInpaintingInput, "inpainting", "krea"),
    },
    "fal-ai/flux-kontext": {
        "dev": Endpoint(KontextEditInput, "edit", "kontext"),
    },
    "fal-ai/flux-kontext-lora": {
        "": Endpoint(KontextLoraEditInput, "edit", "kontext"),
        "text-to-image": Endpoint(KontextLoraTextToImageInput, "text-to-image", "kontext"),
        "inpaint": Endpoint(KontextLoraInpaintInput, "edit-inpainting", "kontext"),
    },
    "fal-ai/flux-lora-fill": {
        "": Endpoint(FillInput, "fill", "fill"),
    },
}


@dataclass(frozen=True)
class Route:
    """A submit path resolved: the app id the client used (its requests live under it), the
    endpoint's row, and the checkpoint that runs it (the row's, or the fine-tune's)."""

    app_id: str
    endpoint: str
    spec: Endpoint
    variant: str

    @property
    def model_id(self) -> str:
        """The id a client submits to: `fal-ai/flux/dev`, `fal-ai/flux-lora` (endpoint "")."""
        return f"{self.app_id}/{self.endpoint}" if self.endpoint else self.app_id


class UnknownApp(LookupError):
    pass


class UnknownEndpoint(LookupError):
    pass


def resolve(owner: str, app: str, endpoint: str) -> Route:
    """The route of `POST /{owner}/{app}/{endpoint}`. Raises UnknownApp or UnknownEndpoint
    (fine-tune app ids included: an owner that cannot name a fine-tune is an unknown app; whether
    the fine-tune is configured is the caller's check, server/api/variants.py)."""
    app_id = f"{owner}/{app}"
    if owner == FAL_OWNER:
        endpoints = APPS.get(app_id)
        if endpoints is None:
            raise UnknownApp(f"Application '{app_id}' not found")
        spec = endpoints.get(endpoint)
        if spec is None:
            raise UnknownEndpoint(f"Endpoint '{endpoint}' of '{app_id}' not found")
        return Route(app_id, endpoint, spec, spec.variant)
    endpoints = APPS.get(f"{FAL_OWNER}/{app}")
    if endpoints is None or fine_tune_name_problem(owner) is not None:
        raise UnknownApp(f"Application '{app_id}' not found")
    spec = endpoints.get(endpoint)
    if spec is None or spec.variant != BASE_VARIANT:
        raise UnknownEndpoint(
            f"Endpoint '{endpoint}' of '{app_id}' not found: a fine-tune serves the endpoints of "
            f"{FAL_OWNER}/{app} that run on the base model ({', '.join(fine_tunable(app)) or 'none'})"
        )
    return Route(app_id, endpoint, spec, variant=owner)


def fine_tunable(app: str) -> list[str]:
    """The endpoints of fal-ai/`app` a fine-tune can run ("" shown as the app itself)."""
    endpoints = APPS.get(f"{FAL_OWNER}/{app}", {})
    return [name or "(the app itself)" for name, spec in endpoints.items() if spec.variant == BASE_VARIANT]


def is_endpoint(owner: str, app: str, endpoint: str) -> bool:
    try:
        resolve(owner, app, endpoint)
    except LookupError:
        return False
    return True


def bare_app_names() -> list[str]:
    """The `app` part of apps served at their own id (`flux-lora` of `POST /fal-ai/flux-lora`);
    a fine-tune serves them under its own owner (`POST /mystyle/flux-lora`)."""
    return [app_id.split("/", 1)[1] for app_id, endpoints in APPS.items() if "" in endpoints]
