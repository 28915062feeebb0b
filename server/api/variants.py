"""A request for a checkpoint this server does not serve: one error, rendered by each protocol.

An endpoint whose variant is not configured (Kontext without `--variant kontext=PATH`, a
fine-tune app id no `--variant` names) answers 404 in the protocol's own shape: fal
`{"detail", "error_type": "variant_not_configured"}` with `x-fal-error-type`, OpenAI
`{"error": {..., "code": "model_not_found"}}`. 404, not 503: it is permanent for this server's
configuration, and no client retries a 404 (fal's retry 408, 409, 429 and 5xx; OpenAI's 408, 409,
429 and 5xx), nor a 422 (which fal's JS client would read as a field error of the body).
"""

from __future__ import annotations

from server.config import Settings
from server.variant_names import served_variants

NOT_CONFIGURED = "variant_not_configured"
NOT_SERVED_STATUS = 404


class VariantNotServed(Exception):
    def __init__(self, variant: str, what: str) -> None:
        self.variant = variant
        self.message = (
            f"{what} runs on the '{variant}' checkpoint, which this server does not serve. "
            f"The operator adds it with `--variant {variant}=PATH` "
            f'(or FLUX_VARIANTS=\'{{"{variant}": "PATH"}}\'), a diffusers folder or a single-file '
            "transformer; see docs/configuration.md."
        )
        super().__init__(self.message)


def require_served(settings: Settings, variant: str, what: str) -> None:
    """Raise VariantNotServed unless `variant` is the base or a configured variant; `what`
    names the endpoint or model for the message."""
    if variant not in served_variants(settings):
        raise VariantNotServed(variant, what)
