"""Webhook signatures: fal's Ed25519 scheme (public keys served as JWKS, see server/api/webhooks/keys.py)
and BFL's HMAC-SHA256. Both the signing side and a receiver's verification, for tests and
for users who want a reference."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_TOLERANCE_SECONDS = 300


def fal_signature_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()


def fal_signature_headers(
    body: bytes, *, request_id: str, user_id: str, key: Ed25519PrivateKey, timestamp: int | None = None
) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = key.sign(fal_signature_message(request_id, user_id, ts, body))
    return {
        "X-Fal-Webhook-Request-Id": request_id,
        "X-Fal-Webhook-User-Id": user_id,
        "X-Fal-Webhook-Timestamp": ts,
        "X-Fal-Webhook-Signature": signature.hex(),
    }


def verify_fal_signature(
    headers: Mapping[str, str], body: bytes, public_keys: list[Ed25519PublicKey], now: float | None = None
) -> bool:
    """What a receiver does (fal's documented steps): fresh timestamp, then any key verifies."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        request_id = lowered["x-fal-webhook-request-id"]
        user_id = lowered["x-fal-webhook-user-id"]
        timestamp = lowered["x-fal-webhook-timestamp"]
        signature = bytes.fromhex(lowered["x-fal-webhook-signature"])
        age = abs((time.time() if now is None else now) - int(timestamp))
    except (KeyError, ValueError):
        return False
    if age > SIGNATURE_TOLERANCE_SECONDS:
        return False
    message = fal_signature_message(request_id, user_id, timestamp, body)
    for key in public_keys:
        with contextlib.suppress(InvalidSignature):
            key.verify(signature, message)
            return True
    return False


def bfl_signature(secret: str, body: bytes) -> str:
    """The `X-BFL-Signature` header value."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_bfl_signature(secret: str, body: bytes, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(bfl_signature(secret, body), header)
