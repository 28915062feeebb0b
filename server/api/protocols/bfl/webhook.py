"""BFL's webhook: the `get_result` body, HMAC-signed when the client gave a secret."""

from __future__ import annotations

import json

from server.api.protocols.bfl.adapter import webhook_payload
from server.api.webhooks.signing import bfl_signature
from server.jobs import JobRecord


def render_webhook(record: JobRecord) -> tuple[bytes, dict[str, str]]:
    """The dispatcher's renderer for BFL webhooks: body and signature header."""
    body = json.dumps(webhook_payload(record)).encode()
    secret = record.job.webhook.secret if record.job.webhook is not None else None
    return body, {"X-BFL-Signature": bfl_signature(secret, body)} if secret else {}
