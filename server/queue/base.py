"""The queue contract: every operation the API, the workers, the supervisor and the webhook
dispatcher use, implemented by the SQLite backend (one box) and by any other backend.

States: IN_QUEUE -> IN_PROGRESS -> COMPLETED. COMPLETED carries a result or an error
(cancellation and timeouts included); no other state exists, because fal's clients reject any
other status string.

Several processes (and, with a database server, several machines) share one store, so every
method reads and writes that store; change notifications travel between processes, and a
waiter never relies on a sleep-polling loop as its main path. Every method may block on I/O:
async code calls the synchronous ones through `asyncio.to_thread`.

Ordering: normal priority before low; within a priority, tenants take turns (fair share,
weighted: server/queue/fairshare.py), and each tenant's jobs are FIFO; a job put back after a
lost worker goes to the head. A job whose lease runs out is retried once (`MAX_ATTEMPTS` in
all), then completes with `runner_disconnected`.

Input images (`Job.image`, `Job.mask`) are stored apart from the job, in the transaction
that stores it, and read back only by `claim`: every other record (`store`'s, `get`'s,
`purge`'s) carries the job without them, so status polls cost the same whatever the job
carries. Completing a job (any path) deletes them.

Usage (server/queue/usage.py): the transaction that completes a job (any path) also adds
it to its tenant's usage row of the day; usage rows outlive the purge.

Webhooks: whenever a job with a webhook completes (any path), the transaction that completes
it also writes its delivery row. Dispatchers lease due rows (`lease_deliveries`), so each
attempt is made by one dispatcher at a time, across every process sharing the store.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from server.jobs import Job, JobError, JobRecord, JobResult, new_request_id
from server.queue.fairshare import validated_weights
from server.queue.idempotency import IdempotencyKey, IdempotencyMismatch, Submitted
from server.queue.usage import UsageRow

# A job whose worker vanished is tried this many times in all before it fails.
MAX_ATTEMPTS = 2
# The most completed records one `purge` call deletes (one short transaction each).
PURGE_BATCH = 200


def heartbeat_interval(lease_seconds: float) -> float:
    """How often a worker's `claim` and `renew` calls refresh its registry row."""
    return min(5.0, lease_seconds / 3)


def alive_window(lease_seconds: float) -> float:
    """A worker whose row was refreshed within this many seconds is alive. A busy worker
    renews every third of a lease; an idle one claims every second."""
    return max(lease_seconds, 3 * heartbeat_interval(lease_seconds))


class Heartbeats:
    """When each worker of this handle last refreshed its registry row."""

    def __init__(self, lease_seconds: float) -> None:
        self.interval = heartbeat_interval(lease_seconds)
        self._last: dict[str, float] = {}

    def due(self, worker_id: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(worker_id, float("-inf")) < self.interval:
            return False
        self._last[worker_id] = now
        return True


class CancelOutcome(str, Enum):
    CANCELLED = "CANCELLED"  # was queued: completed at once as cancelled
    REQUESTED = "REQUESTED"  # is running: the worker stops at its next denoising step
    ALREADY_COMPLETED = "ALREADY_COMPLETED"
    NOT_FOUND = "NOT_FOUND"


class QueueUnavailable(RuntimeError):
    """The store cannot be reached right now (a database server down or restarting).

    Callers answer 503 (the API) or wait and retry (workers, background tasks); the backend
    reconnects by itself, so no process needs a restart."""


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    state: str  # "loading", "warming", "ready", "failed", "stopped"
    device: str
    model: str
    detail: str
    pid: int
    updated_at: float  # unix time of the last state change or heartbeat

    def held_variants(self) -> dict[str, list[str]] | None:
        """Where this worker's variants are ("device", "host", "disk": names, pinned ones with
        " (pinned)"), from the `variants [device: a, b; host: c]` part of its detail
        (models/runtime.py `FluxRuntime.summary`); None when it serves the base alone."""
        match = re.search(r"variants \[([^\]]*)\]", self.detail)
        if match is None:
            return None
        places: dict[str, list[str]] = {}
        for part in match.group(1).split("; "):
            place, _, names = part.partition(": ")
            places[place.strip()] = [n.strip() for n in names.split(", ") if n.strip()]
        return places


@dataclass(frozen=True)
class ClaimPreference:
    """A worker's hint for `claim`: among the first `window` queued jobs of the head's
    priority and tenant, take the first that `wants` (e.g. its LoRAs are already loaded on this
    worker, its variant is on this worker's GPU) instead of the head, unless the head has waited
    `max_wait` seconds or more. So a preference reorders only nearby jobs of one tenant, never
    passes another tenant's job (fair share holds), and never delays any job by more than
    `max_wait` (plus the jobs already running).

    `can_take`: the jobs this worker can run at all (a worker that serves only some variants);
    the others are left to other workers, and "the head" is the first job it can take. None
    of the window takeable: it claims nothing this time."""

    wants: Callable[[Job], bool]
    window: int = 8
    max_wait: float = 10.0
    can_take: Callable[[Job], bool] | None = None

    def choose(self, rows: Sequence[tuple[str, int, float, str]], now: float) -> str | None:
        """The id to claim among queued rows `(id, priority_rank, created_at, job_json)` in
        claim order (the head first, at most `window` of them); None: none it can take."""
        parsed: dict[str, Job] = {}

        def job(row: tuple[str, int, float, str]) -> Job:  # parsed once, and only when looked at
            if row[0] not in parsed:
                parsed[row[0]] = Job.model_validate_json(row[3])
            return parsed[row[0]]

        takeable = list(rows) if self.can_take is None else [r for r in rows if self.can_take(job(r))]
        if not takeable:
            return None
        head_id, head_rank, head_created, _ = takeable[0]
        if now - head_created >= self.max_wait:
            return head_id
        head_tenant = job(takeable[0]).tenant
        for row in takeable:
            if row[1] != head_rank or job(row).tenant != head_tenant:
                break
            if self.wants(job(row)):
                return row[0]
        return head_id


@dataclass(frozen=True)
class Delivery:
    """One webhook delivery row: a request's webhook, its attempts so far, its state."""

    request_id: str
    due_at: float  # unix time of the next attempt (pushed forward while an attempt is leased)
    attempts: int
    last_error: str | None = None
    delivered_at: float | None = None
    gave_up: bool = False


@dataclass(frozen=True)
class QueueCounts:
    """How many requests wait (by priority: "normal", "low") and how many run, for metrics."""

    queued: dict[str, int]
    running: int


class JobQueue(ABC):
    # Fair-share weight per tenant (absent: 1), read by `store` (server/queue/fairshare.py).
    tenant_weights: Mapping[str, float] = MappingProxyType({})

    def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        """Weigh tenants' turns from now on (e.g. from the keys file, whenever it changes):
        weight 2 gets twice the jobs of weight 1 while both wait. Applies to jobs stored
        after the call; raises ValueError for a weight that is not a positive number."""
        self.tenant_weights = validated_weights(weights)

    # --- producer side (API process) -----------------------------------------------------
    def submit(self, job: Job, request_id: str | None = None) -> JobRecord:
        """Store a job durably (committed before this returns) and wake a waiting worker."""
        return self.submit_with_position(job, request_id)[0]

    def submit_with_position(self, job: Job, request_id: str | None = None) -> tuple[JobRecord, int]:
        """`submit`, plus the number of jobs ahead of the new one (its queue position)."""
        return self.store([(job, request_id or new_request_id())])[0]

    def submit_many(self, jobs: list[Job]) -> list[tuple[JobRecord, int]]:
        """Several `submit_with_position`s, in order, in one commit (the API's AsyncQueue groups
        concurrent submits into one call)."""
        return self.store([(job, new_request_id()) for job in jobs])

    @abstractmethod
    def store(self, entries: list[tuple[Job, str]]) -> list[tuple[JobRecord, int]]:
        """Insert `(job, request id)` pairs (and their input images) in order in one
        transaction, wake the workers, and return each record, without its input images, with
        its queue position as stored."""

    @abstractmethod
    def store_once(self, job: Job, request_id: str, key: IdempotencyKey) -> Submitted:
        """Store `job` as `store` does, unless `key` (tenant, key) was stored within its window:
        then store nothing and return that earlier job (`repeated`), or raise
        IdempotencyMismatch when the earlier request's hash differs. The key's row is written
        in the job's transaction, so concurrent submits of one key, on any process or box,
        store one job. Deletes the keys older than the window on the way."""

    def _repeat(self, request_id: str, body_hash: str, key: IdempotencyKey) -> Submitted | None:
        """A keyed submit that found its key held by `request_id` (stored with `body_hash`):
        that job, or None when it was purged since (the caller stores anew)."""
        if body_hash != key.body_hash:
            raise IdempotencyMismatch(key.key)
        record = self.get(request_id, with_logs=False)
        if record is None:
            return None
        return Submitted(record, self.position(request_id), repeated=True)

    @abstractmethod
    def usage(self, first_day: str | None = None, last_day: str | None = None) -> list[UsageRow]:
        """The usage rows of UTC days `first_day`..`last_day` (YYYY-MM-DD, both included; None:
        unbounded), ordered by day, tenant, app id (server/queue/usage.py)."""

    @abstractmethod
    def usage_totals(self) -> list[UsageRow]:
        """Every day summed, per tenant and app id (`day` ""), ordered by tenant, app id: the
        counters /metrics shows."""

    @abstractmethod
    def get(self, request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        """The record, without its input images; `with_logs=False` leaves `logs` empty
        (cheaper, for status polls)."""

    @abstractmethod
    def position(self, request_id: str) -> int | None:
        """Jobs ahead of this one in claim order (normal priority before low, then fair share
        between tenants, then FIFO); None if not queued.
        Cheap however long the queue is (no scan of every queued row)."""

    @abstractmethod
    def depth(self) -> int:
        """Number of queued jobs."""

    @abstractmethod
    def active_count(self, tenant: str | None) -> int:
        """The tenant's jobs queued or running (its `queued` quota); None is the unnamed
        tenant. One indexed read: queued jobs by tenant, running ones (few) by lease."""

    @abstractmethod
    def counts(self) -> QueueCounts:
        """Queued jobs per priority (every priority named, zeros included) and running jobs."""

    @abstractmethod
    def cancel(self, request_id: str) -> CancelOutcome:
        """A queued job completes as cancelled at once; a running one is flagged, and its
        worker (on any box) stops at its next step."""

    @abstractmethod
    async def wait_for_change(self, request_id: str, timeout: float) -> None:
        """Return when the request may have changed (status, log, progress) or after timeout
        (at most a short fallback poll). Read the record and call this without an `await` in
        between, or a change in that gap is seen only after the fallback poll."""

    # --- consumer side (worker process) --------------------------------------------------
    @abstractmethod
    def claim(
        self, worker_id: str, timeout: float, prefer: ClaimPreference | None = None
    ) -> JobRecord | None:
        """Atomically take the next job and a lease on it, waiting up to `timeout` seconds;
        the record's job carries its input images (the one read that does).
        `prefer`: see ClaimPreference; without it, strictly the head. Each call (and each
        `renew`) is also the worker's heartbeat: it refreshes the worker's registry row, at
        most every `heartbeat_interval`."""

    @abstractmethod
    def interrupt_claim(self) -> None:
        """Make a `claim` blocked in this process return early (safe from a signal handler)."""

    @abstractmethod
    def renew(self, request_id: str, worker_id: str) -> bool:
        """Extend the lease; False if the worker no longer holds it."""

    @abstractmethod
    def is_cancel_requested(self, request_id: str) -> bool: ...

    @abstractmethod
    def log(self, request_id: str, message: str, progress: float | None = None) -> None:
        """Append a timestamped log line (and optionally the progress, 0..1) and notify."""

    @abstractmethod
    def complete(self, request_id: str, worker_id: str, result: JobResult) -> bool:
        """Complete a job the worker holds; False if it no longer holds it.

        Idempotent: if the job is already COMPLETED by this worker with this same result, it
        returns True again. So a caller that saw an exception (with a database server, a
        COMMIT whose acknowledgement was lost: the job may be completed or not) retries
        `complete`, and may delete the result's files only when it returned False: then the
        stored record surely does not reference them."""

    @abstractmethod
    def fail(self, request_id: str, worker_id: str | None, error: JobError) -> bool:
        """Complete with `error`. A worker may fail only a job it holds; `worker_id=None`
        (the system) may fail any job that has not completed."""

    @abstractmethod
    def requeue(self, request_id: str, worker_id: str, message: str = "Worker stopping; requeued") -> bool:
        """Give a held job back to the head of the queue without counting the attempt (a
        worker shutting down cleanly)."""

    # --- maintenance (API background task, supervisor) -----------------------------------
    @abstractmethod
    def recover_expired(self) -> list[str]:
        """Jobs whose lease ran out go back to the head of the queue once, then fail with
        error_type runner_disconnected; queued jobs past their start deadline fail with
        request_timeout. Returns the affected ids. Takes no write transaction (no lock)
        when nothing is due, so that every API process may call it once a second."""

    @abstractmethod
    def release_worker(self, worker_id: str) -> list[str]:
        """A worker is known dead: treat its leases as expired now."""

    @abstractmethod
    def purge(self, older_than: float, limit: int = PURGE_BATCH) -> list[JobRecord]:
        """Delete at most `limit` completed records finished before `older_than` (unix time),
        with their logs and delivery rows, in one short transaction; return them (without
        logs) so that their files can be deleted too. Each record is returned by exactly one
        call, also when several processes purge at once. Call again while it returns `limit`."""

    @abstractmethod
    def result_file_names(self, completed_since: float) -> set[str]:
        """The file names of the images of every result completed at or after
        `completed_since` (unix time): what the orphan sweep must not delete. One read; its
        cost grows with the records completed since then, not with all records."""

    # --- worker registry (for /health) ---------------------------------------------------
    @abstractmethod
    def set_worker_state(
        self, worker_id: str, state: str, *, device: str, model: str, detail: str = ""
    ) -> None:
        """Record a worker's state; calling it again with the same state is its heartbeat."""

    @abstractmethod
    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (the supervisor, after it has released the worker's jobs)."""

    @abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """Every registered worker, ordered by id."""

    # --- webhook deliveries (API process) ------------------------------------------------
    @abstractmethod
    def lease_deliveries(self, now: float, limit: int, hold_until: float) -> list[Delivery]:
        """Take up to `limit` rows due at `now` by pushing their `due_at` to `hold_until`, in
        one transaction: no other dispatcher sees them until then (a dispatcher that dies
        mid-send only delays its rows). Returns the rows as they were before the lease."""

    @abstractmethod
    def next_delivery_due(self) -> float | None:
        """The earliest `due_at` of the rows still to deliver, or None."""

    @abstractmethod
    def delivery_succeeded(self, request_id: str, attempts: int, now: float) -> None: ...

    @abstractmethod
    def delivery_failed(self, request_id: str, attempts: int, error: str, next_due_at: float | None) -> None:
        """Record a failed attempt; `next_due_at=None` means give up."""

    @abstractmethod
    def delivery(self, request_id: str) -> Delivery | None:
        """The delivery row of a request, or None."""

    @abstractmethod
    async def wait_for_deliveries(self, timeout: float) -> None:
        """Sleep until a delivery may have become due, at most `timeout`."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and sockets."""
