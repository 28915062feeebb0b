"""`Idempotency-Key` on submit routes: a retried submit gets the first one's request id.

A client that lost the answer to a submit (a dropped connection, a timeout; @fal-ai/client
1.10.1 retries a submit by itself after a dropped connection) sends it again with the same
key and gets the same request id, without a second job, from any API process on any box
(the key is stored with the job: server/queue/idempotency.py). Keys are per tenant and stand
for `--idempotency-window-seconds` (default 24 h).

What "the same request" means: the same method, path, query, the headers that shape a job
(`x-fal-request-timeout`, `x-fal-queue-priority`) and the same body. The body is hashed as it
streams in (`FingerprintMiddleware`: nothing is buffered), with a multipart body's boundary
left out (an SDK draws a new one for each try). The same key with another request is a 422
in the protocol's shape: the client's mistake, which retrying cannot fix (never 409, which
fal's clients retry).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.auth import caller_of
from server.api.deps import get_queue, get_settings
from server.jobs import Job
from server.queue.idempotency import MAX_KEY_LENGTH, IdempotencyKey, IdempotencyMismatch, Submitted

HEADER = "idempotency-key"
# Request headers that change the job a submit makes: part of what "the same request" is.
SHAPING_HEADERS = ("x-fal-request-timeout", "x-fal-queue-priority")
_STATE_KEY = "body_fingerprint"
_BOUNDARY_STANDIN = b"\x00boundary\x00"


class BodyHasher:
    """SHA-256 of a body fed in chunks, with every occurrence of `boundary` replaced (also
    one split across two chunks)."""

    def __init__(self, boundary: bytes | None) -> None:
        self._hash = hashlib.sha256()
        self._boundary = boundary or None
        self._pending = b""
        self.complete = False

    def feed(self, chunk: bytes, more: bool) -> None:
        data = self._pending + chunk
        if self._boundary is not None:
            data = data.replace(self._boundary, _BOUNDARY_STANDIN)
            # The tail might be the start of a boundary that the next chunk completes.
            keep = 0 if not more else min(len(data), len(self._boundary) - 1)
            self._pending, data = data[len(data) - keep :], data[: len(data) - keep]
        self._hash.update(data)
        self.complete = not more

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _boundary(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"content-type" and value.lower().startswith(b"multipart/"):
            for part in value.split(b";"):
                key, _, boundary = part.strip().partition(b"=")
                if key.lower() == b"boundary":
                    return boundary.strip(b'"')
    return None


class FingerprintMiddleware:
    """Hashes the body of each POST that carries an Idempotency-Key while the route reads it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keyed = scope["type"] == "http" and scope["method"] == "POST"
        if not keyed or not any(name == HEADER.encode() for name, _ in scope["headers"]):
            await self.app(scope, receive, send)
            return
        hasher = BodyHasher(_boundary(scope))
        scope.setdefault("state", {})[_STATE_KEY] = hasher

        async def hashing_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                hasher.feed(message.get("body", b""), message.get("more_body", False))
            return message

        await self.app(scope, hashing_receive, send)


def idempotency_key(request: Request) -> IdempotencyKey | None:
    """The request's key, or None when it sent none; raises RequestValidationError (422 in
    the protocol's shape) for an empty or overlong key. Call after the route read its body."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > MAX_KEY_LENGTH:
        message = f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters"
        raise IdempotencyKeyRefused(message, raw, "idempotency_key_invalid")
    hasher: BodyHasher | None = request.scope.get("state", {}).get(_STATE_KEY)
    body = hasher.hexdigest() if hasher is not None and hasher.complete else ""
    request_hash = hashlib.sha256()
    for part in (
        request.method,
        request.url.path,
        json.dumps(sorted(request.query_params.multi_items())),  # unambiguous, in any order
        *(request.headers.get(name, "") for name in SHAPING_HEADERS),
        body,
    ):
        request_hash.update(part.encode() + b"\n")
    return IdempotencyKey(
        tenant=caller_of(request).tenant or "",
        key=key,
        body_hash=request_hash.hexdigest(),
        window_seconds=get_settings(request).idempotency_window_seconds,
    )


class IdempotencyKeyRefused(RequestValidationError):
    """An Idempotency-Key the server cannot honour (empty, too long, used for another
    request): rendered as each protocol renders a 422 (OpenAI's renderer picks it out)."""

    def __init__(self, message: str, key: str, error_type: str) -> None:
        error: dict[str, Any] = {"loc": ("header", HEADER), "msg": message, "type": error_type, "input": key}
        super().__init__([error])
        self.message = message
        self.error_type = error_type


def keyed(request: Request) -> bool:
    """Whether the request carries an Idempotency-Key (then its client will come back for it)."""
    return HEADER in request.headers


async def store(request: Request, job: Job) -> Submitted:
    """Store `job` (already stamped with its tenant and admitted by server/api/tenancy.py),
    or, for a repeated Idempotency-Key, return the key's job without storing anything."""
    key = idempotency_key(request)
    queue = get_queue(request)
    if key is None:
        record, position = await queue.submit(job)
        return Submitted(record, position, repeated=False)
    try:
        return await queue.submit_once(job, key)
    except IdempotencyMismatch as exc:
        raise IdempotencyKeyRefused(str(exc), key.key, "idempotency_key_reused") from None
