"""One request-size limit for every protocol: a body over `settings.request_body_limit`
bytes is refused with 413, in the error shape of the protocol whose route reads it.

The middleware does not answer by itself: it hands the route a `receive` that raises an
`HTTPException(413)` as soon as the body (declared or actually sent) goes over the limit. The
exception surfaces where the route reads its body (FastAPI's JSON parsing, a multipart form,
fal's raw read), so each protocol's own error handling renders it; nothing over the limit is
ever buffered.
"""

from __future__ import annotations

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    """`exempt_prefix`: paths whose routes enforce a limit of their own (file uploads)."""

    def __init__(self, app: ASGIApp, limit: int, exempt_prefix: str | None = None) -> None:
        self.app = app
        self.limit = limit
        self.exempt_prefix = exempt_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exempt = self.exempt_prefix is not None and scope.get("path", "").startswith(self.exempt_prefix)
        if scope["type"] != "http" or exempt:
            await self.app(scope, receive, send)
            return
        declared = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
        declared_size = int(declared) if declared.isdigit() else 0
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if max(received, declared_size) > self.limit:
                    raise HTTPException(
                        status_code=413, detail=f"The request body is larger than {self.limit} bytes"
                    )
            return message

        await self.app(scope, limited_receive, send)
