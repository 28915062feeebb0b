"""API keys: `Authorization: Key <k>`, `Authorization: Bearer <k>` or `x-key: <k>`.

With no key configured, authentication is off (the API process refuses to listen on a
non-loopback address in that case unless told `--insecure-no-auth`). Keys are compared whole,
so fal's `Key id:secret` form works when the configured key is `id:secret`.

Every protocol builds its route dependency with `api_key_dependency`, handing in how it
refuses a request in its own error shape (fal: 401 `{"detail": ...}`, BFL: 401/403, OpenAI:
401 `{"error": ...}`); the checking itself is the same for all.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from enum import Enum

from fastapi import Request

from server.config import Settings
from server.tenants import ANONYMOUS, Caller

SCHEMES = ("key", "bearer")


def presented_key(request: Request) -> str | None:
    """The key a request carries, from whichever header it used."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() in SCHEMES and value.strip():
            return value.strip()
    x_key = request.headers.get("x-key")
    if x_key and x_key.strip():
        return x_key.strip()
    return None


def key_is_valid(settings: Settings, key: str | None, keys: set[str] | None = None) -> bool:
    """`keys` defaults to the settings' keys (read afresh, keys file included)."""
    if keys is None:
        keys = settings.all_api_keys()
    if not keys:
        return True
    if key is None:
        return False
    # Compare against every key without stopping early, so timing reveals nothing.
    matched = False
    for candidate in keys:
        matched |= hmac.compare_digest(candidate.encode(), key.encode())
    return matched


def check_api_key(request: Request) -> bool:
    """True when auth is off or the request carries a configured key."""
    state = request.app.state
    # create_app reads the keys (file included) once; a changed keys file needs a restart.
    keys = getattr(state, "api_keys", None)
    if keys is not None and not keys:
        return True  # auth is off: no need to parse headers
    return key_is_valid(state.settings, presented_key(request), keys)


class KeyProblem(str, Enum):
    MISSING = "missing"  # no key in any of the accepted headers
    INVALID = "invalid"  # a key that is not configured


def api_key_dependency(
    refuse: Callable[[KeyProblem], Exception],
) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that lets a request through when auth is off or its key is
    valid, and otherwise raises `refuse(problem)`, the protocol's own error."""

    async def require_api_key(request: Request) -> None:
        if check_api_key(request):
            request.state.caller = ANONYMOUS  # every configured key acts as the one admin tenant
            return
        raise refuse(KeyProblem.MISSING if presented_key(request) is None else KeyProblem.INVALID)

    return require_api_key


def caller_of(request: Request) -> Caller:
    """Who the request acts as (set by the protocol's key check; auth off: `ANONYMOUS`)."""
    return getattr(request.state, "caller", ANONYMOUS)
