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
or tenants wait; a submit reads two index entries more (the tenant's newest queued job, the
class's head). Weights are known where jobs are submitted (the API process, from its keys);
a worker needs no tenant configuration. A weight change applies to jobs submitted after it.

A job put back to the queue (lost worker, stopping worker) gets the smallest queued tag of its
class if its own is larger, and the lowest `seq`: the head, as before fair share.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def next_tag_sql(table: str, placeholder: str) -> str:
    """An expression (in parentheses) giving a new job's fair tag; its parameters are
    `next_tag_params`. Reads two index entries of the queued jobs."""
    return (
        "(COALESCE("
        f"(SELECT fair_tag FROM {table} WHERE status = 'IN_QUEUE' AND {TENANT_KEY} = {placeholder} "
        f"AND priority_rank = {placeholder} ORDER BY fair_tag DESC LIMIT 1) + {placeholder}, "
        f"(SELECT fair_tag FROM {table} WHERE status = 'IN_QUEUE' AND priority_rank = {placeholder} "
        "ORDER BY fair_tag LIMIT 1), 0))"
    )


def next_tag_params(priority_rank: int, tenant: str | None, step: float) -> tuple:
    """The parameters of `next_tag_sql` for one job."""
    return (tenant or "", priority_rank, step, priority_rank)


def requeue_tag_sql(table: str, least: str) -> str:
    """`fair_tag = ...` for a job going back to the queue: at most the class's smallest queued
    tag (the row itself is not queued while this runs), so that it is the head again. `least`:
    the two-argument minimum of the dialect (SQLite's MIN, PostgreSQL's LEAST)."""
    return (
        f"fair_tag = {least}(fair_tag, COALESCE((SELECT MIN(q.fair_tag) FROM {table} q "
        f"WHERE q.status = 'IN_QUEUE' AND q.priority_rank = {table}.priority_rank), fair_tag))"
    )
