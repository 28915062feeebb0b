"""Fair share between tenants (server/queue/fairshare.py), on every queue backend: at equal
priority one tenant's backlog delays another tenant's request by at most about one job per
worker, tenants take (weighted) turns, each tenant's own jobs stay FIFO, and a job put back
still goes to the head."""

from __future__ import annotations

import pytest

from server.jobs import LoraRef
from server.queue.base import ClaimPreference, JobQueue
from tests.server.queue.conftest import QueueBackend, eventually, make_job


def claim_ids(worker: JobQueue, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        record = worker.claim("w1", timeout=0)
        assert record is not None
        ids.append(record.id)
    return ids


def tenants_of(api: JobQueue, ids: list[str]) -> list[str | None]:
    return [api.get(request_id, with_logs=False).job.tenant for request_id in ids]  # type: ignore[union-attr]


@pytest.mark.parametrize("backlog_tenant", ["a", None])
def test_a_single_request_waits_behind_at_most_one_job_of_a_backlog(
    api: JobQueue, worker: JobQueue, backlog_tenant: str | None
) -> None:
    """The issue's case: 200 jobs of A, then 1 of B, one worker: B is claimed within the next
    two claims. Jobs without a tenant are one tenant like any other."""
    backlog = [record.id for record, _ in api.submit_many([make_job(tenant=backlog_tenant)] * 200)]
    single, position = api.submit_with_position(make_job(tenant="b"))
    assert position == 1 and api.position(single.id) == 1  # behind A's first job only
    assert single.id in claim_ids(worker, 2)
    assert api.depth() == 199
    # A's backlog then runs in its own order.
    rest = claim_ids(worker, 199)
    assert rest == [request_id for request_id in backlog if request_id in rest] and len(rest) == 199


def test_a_request_arriving_while_the_backlog_runs_joins_at_the_head(api: JobQueue, worker: JobQueue) -> None:
    api.submit_many([make_job(tenant="a")] * 50)
    claim_ids(worker, 10)
    single = api.submit(make_job(tenant="b")).id
    assert api.position(single) == 1
    assert single in claim_ids(worker, 2)


def test_tenants_take_turns_and_each_tenant_stays_fifo(api: JobQueue, worker: JobQueue) -> None:
    a = [api.submit(make_job(tenant="a")).id for _ in range(4)]
    b = [api.submit(make_job(tenant="b")).id for _ in range(3)]
    c = api.submit(make_job(tenant=None)).id
    positions = [api.position(request_id) for request_id in (*a, *b, c)]
    order = claim_ids(worker, 8)
    assert order == [a[0], b[0], c, a[1], b[1], a[2], b[2], a[3]]
    assert positions == [order.index(request_id) for request_id in (*a, *b, c)]


def test_a_tenant_that_just_ran_waits_for_the_others_turn(api: JobQueue, worker: JobQueue) -> None:
    """B submits its next request as soon as its previous one started: it alternates with
    A's backlog instead of jumping it or waiting for all of it."""
    api.submit_many([make_job(tenant="a")] * 20)
    api.submit(make_job(tenant="b"))
    taken: list[str | None] = []
    for _ in range(8):
        record = worker.claim("w1", timeout=0)
        assert record is not None
        taken.append(record.job.tenant)
        if record.job.tenant == "b":
            api.submit(make_job(tenant="b"))
    assert taken == ["a", "b"] * 4


def test_weights_give_turns_in_proportion(api: JobQueue, worker: JobQueue) -> None:
    api.set_tenant_weights({"heavy": 3})
    api.submit_many([make_job(tenant="light")] * 10)
    api.submit_many([make_job(tenant="heavy")] * 30)
    tenants = tenants_of(api, claim_ids(worker, 20))
    assert tenants.count("heavy") == 15 and tenants.count("light") == 5
    # Interleaved, not in blocks: at every point of the run the shares are about 3 to 1.
    for taken in range(1, 21):
        light = tenants[:taken].count("light")
        assert abs(3 * light - (taken - light)) <= 4, tenants


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf")])
def test_a_weight_must_be_a_positive_number(api: JobQueue, weight: float) -> None:
    with pytest.raises(ValueError, match="tenant 'x'"):
        api.set_tenant_weights({"x": weight})


def test_priorities_still_come_first(api: JobQueue, worker: JobQueue) -> None:
    api.submit_many([make_job(tenant="a")] * 5)
    low = api.submit(make_job(tenant="b", priority="low")).id
    assert api.position(low) == 5
    assert low not in claim_ids(worker, 5)
    assert claim_ids(worker, 1) == [low]


def test_a_job_put_back_goes_to_the_head_whatever_its_tenant(api: JobQueue, worker: JobQueue) -> None:
    first_a = api.submit(make_job(tenant="a")).id
    api.submit_many([make_job(tenant="a")] * 3)
    assert claim_ids(worker, 1) == [first_a]
    api.submit_many([make_job(tenant="b"), make_job(tenant="c")])
    assert worker.requeue(first_a, "w1")  # a worker stopping
    assert api.position(first_a) == 0
    assert claim_ids(worker, 1) == [first_a]


def test_a_lost_lease_puts_the_job_back_at_the_head(backend: QueueBackend) -> None:
    api, worker = backend.open("api"), backend.open("worker", lease_seconds=0.2)
    api.submit_many([make_job(tenant="a")] * 3)
    running = worker.claim("w1", timeout=0)
    assert running is not None
    api.submit(make_job(tenant="b"))
    eventually(lambda: running.id in api.recover_expired(), what="the lease to run out")
    assert api.position(running.id) == 0
    assert claim_ids(worker, 1) == [running.id]


def test_a_lora_preference_never_passes_another_tenants_job(api: JobQueue, worker: JobQueue) -> None:
    """Within one tenant's run of jobs a preference reorders as before (test_claim_preference);
    it never takes a job from behind another tenant's."""
    prefer = ClaimPreference(wants=lambda job: any(lora.path == "ink" for lora in job.loras), window=4)
    a_plain = api.submit(make_job(tenant="a")).id
    b_plain = api.submit(make_job(tenant="b")).id
    a_ink = api.submit(make_job(tenant="a", loras=(LoraRef(path="ink"),))).id
    assert [api.position(i) for i in (a_plain, b_plain, a_ink)] == [0, 1, 2]
    taken = [worker.claim("w1", timeout=0, prefer=prefer) for _ in range(3)]
    assert [record.id for record in taken if record] == [a_plain, b_plain, a_ink]


def test_a_batch_of_several_tenants_gets_each_jobs_position_as_stored(
    api: JobQueue, worker: JobQueue
) -> None:
    """A group commit of many tenants' submits: each job's position counts the jobs queued
    before it in claim order, among those stored before it (the batch's earlier ones too)."""
    old = [record.id for record, _ in api.submit_many([make_job(tenant="a")] * 3)]
    tenants = ["a", "b", "b", None, "c", "a"]
    batch = api.submit_many([make_job(tenant=tenant) for tenant in tenants])
    order = claim_ids(worker, len(old) + len(batch))
    for index, (record, position) in enumerate(batch):
        stored_before = set(old) | {earlier.id for earlier, _ in batch[:index]}
        assert position == sum(
            1 for request_id in order[: order.index(record.id)] if request_id in stored_before
        )
