"""Idempotent submits: one job per (tenant, Idempotency-Key) within a window.

The key's row is stored in the transaction that stores the job (`JobQueue.store_once`), and
a unique (tenant, key) makes a second submit, from any API process on any box, find the
first one's request id instead of storing a job of its own. The row remembers a hash of the
request (`body_hash`): the same key with another request is the client's mistake, refused
(422), never answered with the other request's job. Rows older than the window are deleted
by the next keyed submit; a row whose job was purged meanwhile no longer holds its key.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.jobs import JobRecord

# The longest Idempotency-Key accepted (Stripe's limit, which clients follow).
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class IdempotencyKey:
    tenant: str  # "" for no named key
    key: str
    body_hash: str  # what the request asked for (server/api/idempotency.py)
    window_seconds: float


@dataclass(frozen=True)
class Submitted:
    """A keyed submit's outcome: the job stored now, or the one its key stored before."""

    record: JobRecord
    position: int | None  # queue position while queued
    repeated: bool  # True: the key's earlier job; nothing was stored


class IdempotencyMismatch(ValueError):
    """The key was used within the window for a different request."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for a different request; "
            "send a new key for a new request"
        )
