"""Per-tenant quota decisions: queued requests, submits per minute, images per UTC day.

`QuotaCounters` keeps the per-minute and per-day counts of one API process in memory (no
store read or write on the submit path): with several API processes (`--api-processes`, or
several boxes) each counts its own submits, so a tenant may reach up to N times those two
limits across N processes. The `queued` limit is checked against the queue itself (the
count every process shares), handed in by the caller.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.tenants.caller import Caller

WINDOW_SECONDS = 60.0
QUEUED_RETRY_AFTER = 10  # seconds: a slot frees when one of the tenant's jobs completes


@dataclass(frozen=True)
class OverQuota:
    """Why a submit is refused, and when trying again may succeed (Retry-After, seconds)."""

    message: str
    retry_after: int
    quota: str  # which: "queued", "per_minute" or "images_per_day"


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def seconds_to_next_utc_day(now: float) -> int:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((today + timedelta(days=1)).timestamp() - now))


class QuotaCounters:
    """Per-minute submit times and per-day image counts, by tenant (one API process)."""

    def __init__(self) -> None:
        self._recent: dict[str | None, deque[float]] = {}
        self._images: dict[str | None, tuple[str, int]] = {}  # tenant -> (UTC day, images)
        self._day = (-1.0, "")  # the UTC day last seen: its start (epoch s) and date

    def _utc_day(self, now: float) -> str:
        """`utc_day(now)`, formatted once per day (a check runs on every submit). Epoch time
        counts no leap seconds: every UTC day starts at a multiple of 86400."""
        start = now - now % 86400
        if start != self._day[0]:
            self._day = (start, utc_day(now))
        return self._day[1]

    def check(self, caller: Caller, images: int, now: float | None = None) -> OverQuota | None:
        """Refuse or count a submit of `images` images (counted only when admitted)."""
        quotas = caller.quotas
        now = time.time() if now is None else now
        recent = self._recent.setdefault(caller.tenant, deque())
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        if quotas.per_minute is not None and len(recent) >= quotas.per_minute:
            wait = recent[0] + WINDOW_SECONDS - now if recent else WINDOW_SECONDS
            return OverQuota(
                f"Rate limit: at most {quotas.per_minute} submits per minute for this key",
                max(1, math.ceil(wait)),
                "per_minute",
            )
        day = self._utc_day(now)
        counted_day, used = self._images.get(caller.tenant, (day, 0))
        used = used if counted_day == day else 0
        if quotas.images_per_day is not None and used + images > quotas.images_per_day:
            return OverQuota(
                f"Daily quota: at most {quotas.images_per_day} images per UTC day for this key "
                f"({used} used today, this request asks for {images})",
                seconds_to_next_utc_day(now),
                "images_per_day",
            )
        recent.append(now)
        self._images[caller.tenant] = (day, used + images)
        return None


def check_queued(caller: Caller, active: int) -> OverQuota | None:
    """`active`: the tenant's jobs queued or running now (the queue's count)."""
    limit = caller.quotas.queued
    if limit is not None and active >= limit:
        return OverQuota(
            f"Too many requests in progress: at most {limit} queued or running for this key",
            QUEUED_RETRY_AFTER,
            "queued",
        )
    return None
