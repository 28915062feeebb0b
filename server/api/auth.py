"""API keys: `Authorization: Key <k>`, `Authorization: Bearer <k>` or `x-key: <k>`.

With no key configured, authentication is off (the API process refuses to listen on a
non-loopback address in that case unless told `--insecure-no-auth`). Keys are compared whole,
so fal's `Key id:secret` form works when the configured key is `id:secret`. Each key resolves
to a `Caller` (server/tenants): a named key of the keys file to its tenant, role, quotas and
weight; `--api-key` and legacy keys to one unnamed admin.

Every protocol builds its route dependency with `api_key_dependency`, handing in how it
refuses a request in its own error shape (fal: 401 `{"detail": ...}`, BFL: 401/403, OpenAI:
401 `{"error": ...}`); the checking itself is the same for all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import Enum

from fastapi import Request

from server.config import Settings
from server.tenants import ANONYMOUS, Caller, Role
from server.tenants.keys import KeyRing, ring_of

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


def key_ring(request: Request) -> KeyRing:
    """The keys in force (the app's watcher re-reads a changed keys file within a second)."""
    return request.app.state.keys.ring()


def key_is_valid(settings: Settings, key: str | None) -> bool:
    """Whether `key` is accepted by `settings`' keys (read afresh, keys file included)."""
    ring = ring_of(settings)
    return not ring.enabled or ring.resolve(key) is not None


def resolve_caller(request: Request) -> Caller | None:
    """Who the request acts as: ANONYMOUS when auth is off, the key's caller, or None (no
    key, or one that is unknown or revoked)."""
    ring = key_ring(request)
    if not ring.enabled:
        return ANONYMOUS  # auth is off: no need to parse headers
    return ring.resolve(presented_key(request))


def check_api_key(request: Request) -> bool:
    """True when auth is off or the request carries a key in force (of any role)."""
    return resolve_caller(request) is not None


class KeyProblem(str, Enum):
    MISSING = "missing"  # no key in any of the accepted headers
    INVALID = "invalid"  # a key that is not configured, was revoked, or may only read /metrics


def api_key_dependency(
    refuse: Callable[[KeyProblem], Exception],
) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency that lets a request through when auth is off or its key is in
    force, puts its `Caller` on `request.state.caller`, and otherwise raises
    `refuse(problem)`, the protocol's own error. A metrics key is refused like an unknown one."""

    async def require_api_key(request: Request) -> None:
        caller = resolve_caller(request)
        if caller is not None and caller.role is not Role.METRICS:
            request.state.caller = caller
            return
        raise refuse(KeyProblem.MISSING if presented_key(request) is None else KeyProblem.INVALID)

    return require_api_key


def caller_of(request: Request) -> Caller:
    """Who the request acts as (set by the protocol's key check; auth off: `ANONYMOUS`)."""
    return getattr(request.state, "caller", ANONYMOUS)
