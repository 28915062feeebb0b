"""fal's object lifecycle preference: how long a client wants the files it uploads or a
request generates to stay readable (`X-Fal-Object-Lifecycle` on uploads,
`X-Fal-Object-Lifecycle-Preference` on uploads and, from the JS client's `storageSettings` or
fal_client's `headers=`, on submits)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

LIFECYCLE_HEADERS = ("x-fal-object-lifecycle", "x-fal-object-lifecycle-preference")


def lifecycle_seconds(request: Request) -> float | None:
    """The `expiration_duration_seconds` of the request's lifecycle header (fal's clients send
    it on uploads and, from `storageSettings`, on submits), or None when it names none.
    Raises RequestValidationError for a malformed header."""
    for header in LIFECYCLE_HEADERS:
        raw = request.headers.get(header)
        if raw is None or not raw.strip():
            continue
        try:
            value: Any = json.loads(raw)
            seconds = value.get("expiration_duration_seconds") if isinstance(value, dict) else None
            if seconds is None:
                return None  # a lifecycle without an expiry: the default
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
                raise ValueError("expiration_duration_seconds must be a positive number")
        except ValueError as exc:
            raise RequestValidationError(
                [{"loc": ["header", header], "msg": f"Invalid lifecycle: {exc}", "type": "value_error"}]
            ) from None
        return float(seconds)
    return None
