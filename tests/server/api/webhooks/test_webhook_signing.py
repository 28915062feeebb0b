"""fal's Ed25519 webhook signatures and BFL's HMAC, checked independently of the helpers."""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.api.webhooks.signing import (
    bfl_signature,
    fal_signature_headers,
    verify_bfl_signature,
    verify_fal_signature,
)


def test_fal_signature_follows_the_documented_message() -> None:
    key = Ed25519PrivateKey.generate()
    body = b'{"request_id": "r1", "status": "OK"}'
    headers = fal_signature_headers(body, request_id="r1", user_id="u1", key=key, timestamp=1700000000)
    assert headers["X-Fal-Webhook-Request-Id"] == "r1"
    assert headers["X-Fal-Webhook-User-Id"] == "u1"
    assert headers["X-Fal-Webhook-Timestamp"] == "1700000000"
    # Verify independently of our helper: the message fal documents, the raw signature bytes.
    message = f"r1\nu1\n1700000000\n{hashlib.sha256(body).hexdigest()}".encode()
    key.public_key().verify(bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message)

    public = [key.public_key()]
    assert verify_fal_signature(headers, body, public, now=1700000100)
    assert not verify_fal_signature(headers, body + b" ", public, now=1700000100)
    assert not verify_fal_signature(headers, body, public, now=1700000000 + 301)
    assert not verify_fal_signature(headers, body, [Ed25519PrivateKey.generate().public_key()])
    lowered = {name.lower(): value for name, value in headers.items()}
    assert verify_fal_signature(lowered, body, public, now=1700000000)


def test_bfl_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"id":"x","status":"Ready"}'
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert bfl_signature("s3cret", body) == expected
    assert verify_bfl_signature("s3cret", body, expected)
    assert not verify_bfl_signature("other", body, expected)
    assert not verify_bfl_signature("s3cret", body, None)
