"""BFL's webhook body and its HMAC header."""

from __future__ import annotations

import json

from server.api.protocols.bfl.webhook import render_webhook
from server.api.webhooks.signing import bfl_signature
from server.jobs import JobError
from tests.server.api.webhooks.webhook_records import make_record


def test_bfl_payloads_and_signed_delivery() -> None:
    ready = make_record("bfl")
    body, headers = render_webhook(ready)
    payload = json.loads(body)
    assert payload["id"] == "req-1" and payload["status"] == "Ready"
    assert payload["result"]["sample"] == "https://flux.local:8443/files/abc.jpeg"
    assert payload["result"]["seed"] == 7 and payload["result"]["prompt"] == "a red fox"
    assert payload["timestamp"]
    assert headers["X-BFL-Signature"] == bfl_signature("s", body)

    moderated = json.loads(render_webhook(make_record("bfl", flagged=True))[0])
    assert moderated["status"] == "Content Moderated" and moderated["result"] is None

    error = make_record(
        "bfl", error=JobError(message="out of memory", error_type="internal", status_code=500)
    )
    failed = json.loads(render_webhook(error)[0])
    assert failed["status"] == "Error" and failed["message"] == "out of memory"
    unsigned = make_record("bfl").model_copy(
        update={"job": make_record("bfl").job.model_copy(update={"webhook": None})}
    )
    assert render_webhook(unsigned)[1] == {}
