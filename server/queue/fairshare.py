"""Fair share between tenants: the order in which claims take queued jobs.

Within a priority class, jobs are claimed in the order of a *fair tag* given to each job when
it is stored (start-time fair queueing, as in network schedulers):

- a tenant with jobs already queued in the class: its newest queued job's tag + 1 / weight;
- any other tenant (nothing of it queued in the class): the tag of the class's head, the
  smallest queued tag, so it joins the queue level with the job that runs next;
- an empty class: 0.

Claims take the smallest `(fair_tag, seq)` of the best class. So with equal weights every
tenant's first queued job has the same tag as every other tenant's first, and the tenants take
turns: tenant A's backlog of 200 jobs delays B's single job by at most the one job of A queued
level with it, per worker. With weights the turns are weighted (weight 2: twice the jobs).
Jobs without a tenant (`Job.tenant is None`) are one tenant (the same as a tenant named "",
which no key can be); one tenant alone is plain FIFO.

Why tags stored at submit, not computed at claim: a claim stays the one short statement it was
(the head of an index on `(priority_rank, fair_tag, seq)` of queued jobs), however many jobs
or tenants wait; a submit makes three index reads more (the tenant's newest queued job, the
class's head and tail), once per batch and tenant (`BatchTags`). SQLite stores a batch under
its write lock, so tags are exact; with PostgreSQL two API processes storing one tenant's jobs
at the same instant may give two of them the same tag: they then go in submit order.
Weights are known where jobs are submitted (the API process, from its keys); a worker needs
no tenant configuration. A weight change applies to jobs submitted after it.

A job put back to the queue (lost worker, stopping worker) gets the smallest queued tag of its
class if its own is larger, and the lowest `seq`: the head, as before fair share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

DEFAULT_WEIGHT = 1.0


def validated_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """A copy of a tenant -> weight mapping; raises ValueError for a weight that is not > 0."""
    checked: dict[str, float] = {}
    for tenant, weight in weights.items():
        value = float(weight)
        if not value > 0 or value == float("inf"):
            raise ValueError(
                f"the fair-share weight of tenant {tenant!r} must be a positive number, got {weight!r}"
            )
        checked[tenant] = value
    return checked


def tag_step(weights: Mapping[str, float], tenant: str | None) -> float:
    """How far one job moves its tenant's tags on: 1 / weight (a tenant without a weight, and
    the jobs without a tenant, weigh `DEFAULT_WEIGHT`)."""
    if tenant is None:
        return 1.0 / DEFAULT_WEIGHT
    return 1.0 / weights.get(tenant, DEFAULT_WEIGHT)


# The tenant as the index of each tenant's queued jobs keys it: jobs without a tenant under "",
# so that one statement and one index serve both (a key's name is never empty).
TENANT_KEY = "COALESCE(tenant, '')"


class BatchTags:
    """The rule above for a batch of jobs stored together, from one read of the queue per
    (priority_rank, tenant) pair of the batch (`Known`), applied in order: a job sees the
    batch's jobs before it. `next` also tells whether the job lands at the tail of its class
    (no queued job has a larger tag), where its position needs no count: the common case of
    one tenant's burst."""

    def __init__(self, known: list[Known]) -> None:
        self._newest = {(k.priority_rank, k.tenant_key): k.newest for k in known if k.newest is not None}
        self._heads = {k.priority_rank: k.head for k in known if k.head is not None}
        self._tails = {k.priority_rank: k.tail for k in known if k.tail is not None}

    def next(self, priority_rank: int, tenant: str | None, step: float) -> tuple[float, bool]:
        """The job's tag, and whether it goes after every queued job of its class."""
        key = (priority_rank, tenant or "")
        newest = self._newest.get(key)
        tag = newest + step if newest is not None else self._heads.get(priority_rank, 0.0)
        tail = self._tails.get(priority_rank)
        at_tail = tail is None or tag >= tail
        self._newest[key] = tag
        self._heads.setdefault(priority_rank, tag)
        self._tails[priority_rank] = tag if tail is None else max(tail, tag)
        return tag, at_tail


@dataclass(frozen=True)
class Known:
    """What the queue holds for one (priority_rank, tenant) pair: the tenant's newest queued
    tag, and the class's smallest (head) and largest (tail) queued tags; None: none queued."""

    priority_rank: int
    tenant_key: str  # the tenant, "" for none
    newest: float | None
    head: float | None
    tail: float | None


def known_sql(table: str, placeholder: str) -> str:
    """One row for `Known`; parameters: tenant key, priority_rank (three times)."""
    queued = f"FROM {table} WHERE status = 'IN_QUEUE' AND priority_rank = {placeholder}"
    return (
        f"SELECT (SELECT fair_tag FROM {table} WHERE status = 'IN_QUEUE' AND {TENANT_KEY} = {placeholder} "
        f"AND priority_rank = {placeholder} ORDER BY fair_tag DESC LIMIT 1), "
        f"(SELECT fair_tag {queued} ORDER BY fair_tag LIMIT 1), "
        f"(SELECT fair_tag {queued} ORDER BY fair_tag DESC LIMIT 1)"
    )


def read_known(rows: list[tuple[int, str | None]], fetch_one: Callable[[tuple], tuple]) -> list[Known]:
    """`Known` for every (priority_rank, tenant) pair of a batch's rows; `fetch_one(params)`
    runs `known_sql` with the parameters and returns its row."""
    pairs = sorted({(rank, tenant or "") for rank, tenant in rows})
    return [Known(rank, key, *fetch_one((key, rank, rank, rank))) for rank, key in pairs]


def requeue_tag_sql(table: str, least: str) -> str:
    """`fair_tag = ...` for a job going back to the queue: at most the class's smallest queued
    tag (the row itself is not queued while this runs), so that it is the head again. `least`:
    the two-argument minimum of the dialect (SQLite's MIN, PostgreSQL's LEAST)."""
    return (
        f"fair_tag = {least}(fair_tag, COALESCE((SELECT MIN(q.fair_tag) FROM {table} q "
        f"WHERE q.status = 'IN_QUEUE' AND q.priority_rank = {table}.priority_rank), fair_tag))"
    )
