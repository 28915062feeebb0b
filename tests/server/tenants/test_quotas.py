"""QuotaCounters at the edges of its windows: the per-minute window slides, the per-day count
starts afresh at midnight UTC (and the day, formatted once a day, follows a clock that jumps)."""

from __future__ import annotations

from datetime import UTC, datetime

from server.tenants import Caller, Quotas, Role
from server.tenants.quotas import QuotaCounters

DAILY = Caller(tenant="daily", role=Role.USER, quotas=Quotas(images_per_day=3))
SLOW = Caller(tenant="slow", role=Role.USER, quotas=Quotas(per_minute=2))
MIDNIGHT = datetime(2026, 12, 8, tzinfo=UTC).timestamp()


def test_the_images_of_a_day_are_counted_until_midnight_utc_then_afresh():
    counters = QuotaCounters()
    assert counters.check(DAILY, 3, now=MIDNIGHT - 10) is None
    over = counters.check(DAILY, 1, now=MIDNIGHT - 0.5)
    assert over is not None and over.quota == "images_per_day" and over.retry_after == 1
    assert counters.check(DAILY, 3, now=MIDNIGHT) is None  # a new day
    assert counters.check(DAILY, 1, now=MIDNIGHT + 1) is not None
    # A clock set back is the previous day again; only the latest day's count is kept.
    assert counters.check(DAILY, 3, now=MIDNIGHT - 5) is None
    assert counters.check(DAILY, 1, now=MIDNIGHT - 4) is not None


def test_submits_per_minute_slide_with_the_window():
    counters = QuotaCounters()
    assert counters.check(SLOW, 1, now=100.0) is None
    assert counters.check(SLOW, 1, now=130.0) is None
    over = counters.check(SLOW, 1, now=150.0)
    assert over is not None and over.quota == "per_minute" and over.retry_after == 10
    assert counters.check(SLOW, 1, now=160.0) is None  # the first left the window
