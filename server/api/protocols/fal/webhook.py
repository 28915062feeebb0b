"""fal's webhook: the body (`payload` is exactly what the result route would answer), signed
with this server's Ed25519 key (its public half is served at /.well-known/jwks.json)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from server.api.protocols.fal.adapter import error_parts, output_body
from server.api.webhooks.keys import load_or_create_private_key
from server.api.webhooks.signing import fal_signature_headers
from server.config import Settings
from server.jobs import JobRecord


def webhook_payload(record: JobRecord) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": record.id,
        "gateway_request_id": record.id,
        "status": "OK",
        "payload": None,
        "error": None,
        "payload_error": None,
    }
    if record.result is not None:
        body["payload"] = output_body(record.result, record.job.base_url)
    elif record.error is not None:
        status_code, error_body, _ = error_parts(record.error)
        body["status"] = "ERROR"
        body["error"] = f"Invalid status code: {status_code}"
        body["payload"] = error_body
    return body


def webhook_renderer(settings: Settings) -> Callable[[JobRecord], tuple[bytes, dict[str, str]]]:
    """The dispatcher's renderer for fal webhooks: body and signature headers (signed afresh
    on each attempt: the timestamp is now)."""

    def render(record: JobRecord) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(webhook_payload(record)).encode()
        key = load_or_create_private_key(settings.data_dir)
        headers = fal_signature_headers(body, request_id=record.id, user_id=settings.webhook_user_id, key=key)
        return body, headers

    return render
