"""One id per HTTP request, so that a client's error report finds its log lines.

Every response carries it as `x-request-id`, and every 5xx JSON body as a top-level
`request_id` (added beside the protocol's own fields, so fal's, BFL's and OpenAI's clients
still parse the body). The log line of an unexpected exception names it; the body itself
says only that something failed: exception text, paths and memory figures stay in the log.

The id is the server's own (a client's `x-request-id` is not trusted: it would let a client
make log lines look like another request's). Distinct from a job's request id, which fal's
clients see as `request_id` in submit answers and as `x-fal-request-id` on the responses of
routes that set `request.state.fal_request_id` (added by the same middleware).

A leaf module (Starlette types only): the error handlers and the protocols use it.
"""

from __future__ import annotations

import json
import uuid

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_HEADER_BYTES = HEADER.encode()
# Where the id lives in the ASGI scope's state (`request.state.http_request_id`).
STATE_KEY = "http_request_id"
BODY_FIELD = "request_id"
_FAL_HEADER_BYTES = b"x-fal-request-id"
_FAL_STATE_KEY = "fal_request_id"  # a job's id, set by fal's routes


def request_id_of(request: Request) -> str:
    """This HTTP request's id (one is made here for a request the middleware did not see)."""
    state = request.scope.setdefault("state", {})
    if STATE_KEY not in state:
        state[STATE_KEY] = uuid.uuid4().hex
    return state[STATE_KEY]


def stamped_body(body: bytes, request_id: str) -> bytes:
    """A JSON object body with `request_id` added (kept if present); anything else as is."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or BODY_FIELD in data:
        return body
    return json.dumps({**data, BODY_FIELD: request_id}).encode()


def stamp(response: Response, request_id: str) -> Response:
    """The id on a response made outside the middleware (Starlette sends a 500 from an
    unexpected exception past every middleware)."""
    if HEADER not in response.headers:
        response.headers[HEADER] = request_id
    if response.status_code >= 500 and isinstance(getattr(response, "body", None), bytes):
        response.body = stamped_body(response.body, request_id)
        response.headers["content-length"] = str(len(response.body))
    return response


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name.lower() == b"content-type" and b"json" in value.lower() for name, value in headers)


class RequestIdMiddleware:
    """Gives each HTTP request its id, adds the header to every response and the body field
    to every 5xx JSON response (held until complete: error bodies are small); adds
    `x-fal-request-id` where a route named the job it answers for."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state[STATE_KEY] = request_id
        held: Message | None = None  # a 5xx JSON start, sent with its rewritten body
        chunks: list[bytes] = []

        async def send_with_id(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == _HEADER_BYTES for name, _ in headers):
                    headers.append((_HEADER_BYTES, request_id.encode()))
                if state.get(_FAL_STATE_KEY):
                    headers.append(
                        (_FAL_HEADER_BYTES, str(state[_FAL_STATE_KEY]).encode("latin-1", "replace"))
                    )
                message = {**message, "headers": headers}
                if message["status"] >= 500 and _is_json(headers):
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = stamped_body(b"".join(chunks), request_id)
                headers = [(n, v) for n, v in held["headers"] if n.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**held, "headers": headers})
                message = {"type": "http.response.body", "body": body}
            await send(message)

        await self.app(scope, receive, send_with_id)
