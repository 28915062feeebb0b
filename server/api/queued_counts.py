"""The `queued` quota's counts in one API process: per tenant, its requests queued or running
as last read from the queue, plus what this process admitted since.

The queue's count is the truth every process and box shares, but reading it for each submit
would make every submit of a burst wait for a query (measured: a count query per submit,
serialized, added 50 to 80 % to a 1000-submit burst; each submit waiting for a shared read,
about 10 %: docs/benchmarks.md). So a process keeps a count per tenant and adds its own
admissions to it:

- a count read less than `REUSE_SECONDS` ago serves as it is;
- an older one, up to `USABLE_SECONDS`, serves too, while a new read runs in the background;
- only without a usable count does a submit wait for a read; the submits waiting for one
  read share it and wake together. `warm` reads the counts of the quota keys at start-up, so
  that the first burst of a tenant waits for nothing either.

A count so kept can only be too high for this process's own submits (jobs finish meanwhile):
the caller refuses only on a count read after the submit arrived (`count(read_after=...)`),
so a freed slot is never refused. What it misses are other processes' admissions since it
was read: with several API processes a tenant may pass its limit by what the others
admitted within one read (docs/tenants.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("flux_server.api")

REUSE_SECONDS = 0.05
USABLE_SECONDS = 60.0

Tenant = str | None


@dataclass
class ActiveCount:
    """A tenant's queued-and-running count as this process read it from the queue (at
    `read_at`, monotonic), plus what this process admitted since."""

    value: int
    read_at: float


class QueuedCounts:
    """`read(tenant)`: the queue's count of the tenant's requests queued or running."""

    def __init__(self, read: Callable[[Tenant], Awaitable[int]]) -> None:
        self.read = read
        self._counts: dict[Tenant, ActiveCount] = {}
        self._reads: dict[Tenant, tuple[float, asyncio.Future[None]]] = {}
        # Admitted under a `queued` quota: ever, and not yet stored (the queue's count does
        # not hold those yet, so a burst cannot slip past the limit in between).
        self._admitted: Counter[Tenant] = Counter()
        self._in_flight: Counter[Tenant] = Counter()

    async def count(self, tenant: Tenant, *, read_after: float = -math.inf) -> ActiveCount:
        """The tenant's count for an admission, read at or after `read_after` (monotonic)."""
        known = self._counts.get(tenant)
        now = time.monotonic()
        if known is not None and known.read_at >= read_after:
            age = now - known.read_at
            if age < REUSE_SECONDS:
                return known
            if age < USABLE_SECONDS:
                self._read_started(tenant, now, read_after)
                return known
        await asyncio.shield(self._read_started(tenant, now, read_after))
        # The newest count, which may be newer than the read awaited (reads overlap): every
        # admission must add to the one count the next submits see.
        return self._counts[tenant]

    def admit(self, tenant: Tenant, count: ActiveCount) -> None:
        """Count an admission (`count`: what `count()` returned, with nothing awaited since)."""
        count.value += 1
        self._admitted[tenant] += 1
        self._in_flight[tenant] += 1

    def stored(self, tenant: Tenant) -> None:
        """An admitted submit is in the queue now (or failed): the queue's count holds it."""
        self._in_flight[tenant] -= 1

    async def warm(self, tenants: Iterable[Tenant]) -> None:
        """Read the tenants' counts (at start-up); a read that fails is left to the submits."""
        reads = [self._read_started(tenant, time.monotonic(), -math.inf) for tenant in tenants]
        await asyncio.gather(*reads, return_exceptions=True)

    def known(self, tenant: Tenant) -> ActiveCount | None:
        return self._counts.get(tenant)

    def forget(self) -> None:
        """Drop every count kept (tests: make the next submit read)."""
        self._counts.clear()

    def _read_started(self, tenant: Tenant, now: float, read_after: float) -> asyncio.Future[None]:
        """The read of the tenant's count in progress, or a new one when none is, or when the
        one in progress started before `read_after`. A failed read is never kept: the submits
        waiting for it fail with its error, and the next submit reads again."""
        started, read = self._reads.get(tenant, (-math.inf, None))
        if read is not None and started >= read_after:
            return read
        read = asyncio.ensure_future(self._read_count(tenant, now))
        self._reads[tenant] = (now, read)

        def done(read: asyncio.Future[None]) -> None:
            if self._reads.get(tenant, (0, None))[1] is read:
                del self._reads[tenant]
            if not read.cancelled() and read.exception() is not None:  # retrieved: no warning
                log.debug("count read for tenant %r failed: %s", tenant, read.exception())

        read.add_done_callback(done)
        return read

    async def _read_count(self, tenant: Tenant, read_at: float) -> None:
        # What this process admitted and may not have stored by the time the query runs: the
        # submits in flight now, and those admitted while it runs. One stored before the query
        # is counted twice (a refusal a little early, never an admission too many).
        in_flight_before, admitted_before = self._in_flight[tenant], self._admitted[tenant]
        stored = await self.read(tenant)
        value = stored + in_flight_before + self._admitted[tenant] - admitted_before
        newest = self._counts.get(tenant)
        if newest is None or newest.read_at <= read_at:  # reads may overlap: keep the newest
            self._counts[tenant] = ActiveCount(value, read_at)
