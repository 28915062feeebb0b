"""The identity a request acts under, resolved from its API key."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Role(str, Enum):
    ADMIN = "admin"  # sees and cancels every tenant's requests and files; reads usage
    USER = "user"  # its own requests and files only
    METRICS = "metrics"  # GET /metrics and nothing else


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; None: unlimited."""

    queued: int | None = None  # requests waiting or running at once
    per_minute: int | None = None  # submits per rolling minute
    images_per_day: int | None = None  # images generated per UTC day

    @property
    def unlimited(self) -> bool:
        return self.queued is None and self.per_minute is None and self.images_per_day is None


@dataclass(frozen=True)
class Caller:
    """`tenant` is the key's name (None: auth off, or an unnamed key from `--api-key`, which
    act as one shared admin tenant). Requests are owned by `tenant`; an admin sees all."""

    tenant: str | None
    role: Role
    quotas: Quotas = field(default_factory=Quotas)
    weight: float = 1.0  # fair-share weight of the tenant's jobs

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def owns(self, tenant: str | None) -> bool:
        """Whether this caller may see a request or file owned by `tenant`."""
        return self.is_admin or tenant == self.tenant


# Auth off (no keys configured on a loopback box): one admin tenant, as before tenants existed.
ANONYMOUS = Caller(tenant=None, role=Role.ADMIN)
