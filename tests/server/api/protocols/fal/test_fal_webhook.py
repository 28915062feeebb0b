"""fal's webhook body and its signature headers."""

from __future__ import annotations

import json
from pathlib import Path

from server.api.protocols.fal.webhook import webhook_payload, webhook_renderer
from server.api.webhooks import keys
from server.api.webhooks.signing import verify_fal_signature
from server.config import Settings
from server.jobs import JobError
from tests.server.api.webhooks.webhook_records import make_record


def test_fal_payload_ok_and_error() -> None:
    ok = webhook_payload(make_record("fal"))
    assert ok["request_id"] == ok["gateway_request_id"] == "req-1"
    assert ok["status"] == "OK" and ok["error"] is None and ok["payload_error"] is None
    assert ok["payload"]["images"][0]["url"] == "https://flux.local:8443/files/abc.jpeg"
    assert ok["payload"]["seed"] == 7

    failed = make_record("fal", error=JobError(message="boom", error_type="internal", status_code=500))
    body = webhook_payload(failed)
    assert body["status"] == "ERROR"
    assert body["error"] == "Invalid status code: 500"
    assert body["payload"]["detail"] == "boom"


def test_the_renderer_signs_the_body_with_the_served_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, webhook_user_id="studio")
    body, headers = webhook_renderer(settings)(make_record("fal"))
    assert json.loads(body) == webhook_payload(make_record("fal"))
    assert headers["X-Fal-Webhook-User-Id"] == "studio" and headers["X-Fal-Webhook-Request-Id"] == "req-1"
    public = [keys.load_or_create_private_key(tmp_path).public_key()]
    assert verify_fal_signature(headers, body, public)
