"""The queue contract (server/queue/base.py), run against every backend unchanged.

Each test opens handles on one store as separate processes would ("api", "worker"); waits
are on conditions (a lease running out is awaited by polling `recover_expired`)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from server.jobs import JobError, Status, Webhook, cancelled_error
from server.queue.base import CancelOutcome, JobQueue, QueueCounts
from tests.server.queue.conftest import QueueBackend, eventually, make_job, make_result

HOOK = Webhook(url="https://example.test/hook", kind="fal")


def test_normal_before_low_then_fifo_with_positions_and_depth(api: JobQueue, worker: JobQueue) -> None:
    low1 = api.submit(make_job(priority="low")).id
    normal1 = api.submit(make_job()).id
    low2 = api.submit(make_job(priority="low")).id
    normal2 = api.submit(make_job(prompt="second")).id

    record = api.get(normal2)
    assert record is not None and record.status is Status.IN_QUEUE and record.job.prompt == "second"
    assert api.get("no-such-id") is None
    assert [api.position(i) for i in (normal1, normal2, low1, low2)] == [0, 1, 2, 3]
    assert api.depth() == 4

    claimed = [worker.claim("w1", timeout=0) for _ in range(4)]
    assert [r.id for r in claimed if r] == [normal1, normal2, low1, low2]
    assert worker.claim("w1", timeout=0) is None
    assert api.position(normal1) is None and api.depth() == 0


def test_submit_positions_follow_every_way_in_and_out_of_the_queue(api: JobQueue, worker: JobQueue) -> None:
    low, low_position = api.submit_with_position(make_job(priority="low"))
    normal, normal_position = api.submit_with_position(make_job())
    assert (low_position, normal_position) == (0, 0)  # a normal job goes before the low one
    assert api.submit_with_position(make_job(priority="low"))[1] == 2
    batch = api.submit_many([make_job(), make_job(priority="low"), make_job()])
    assert [position for _, position in batch] == [1, 4, 2]
    assert [api.position(record.id) for record, _ in batch] == [1, 5, 2]
    assert api.depth() == 6

    running = worker.claim("w1", timeout=0)
    assert running is not None and running.id == normal.id and api.depth() == 5
    assert worker.requeue(running.id, "w1")  # back to the head
    assert api.position(normal.id) == 0 and api.depth() == 6
    assert api.cancel(low.id) is CancelOutcome.CANCELLED  # leaves from the middle
    assert api.depth() == 5 and api.position(batch[1][0].id) == 4
    assert api.submit_with_position(make_job(priority="low"))[1] == 5


def test_counts_of_queued_by_priority_and_running(api: JobQueue, worker: JobQueue) -> None:
    assert api.counts() == QueueCounts(queued={"normal": 0, "low": 0}, running=0)
    api.submit_many([make_job(), make_job(), make_job(priority="low")])
    worker.claim("w1", timeout=0)
    assert api.counts() == QueueCounts(queued={"normal": 1, "low": 1}, running=1)


def test_active_count_is_per_tenant_queued_and_running(api: JobQueue, worker: JobQueue) -> None:
    """The `queued` quota's count: a tenant's queued and running jobs, nobody else's."""
    stored = api.submit_many([make_job(tenant="a"), make_job(tenant="a"), make_job(tenant="b"), make_job()])
    assert (api.active_count("a"), api.active_count("b"), api.active_count(None)) == (2, 1, 1)
    claimed = worker.claim("w1", timeout=0)
    assert claimed is not None and claimed.job.tenant == "a"
    assert api.active_count("a") == 2  # one queued, one running
    assert worker.complete(claimed.id, "w1", make_result())
    assert api.active_count("a") == 1
    assert api.cancel(stored[1][0].id) is CancelOutcome.CANCELLED
    assert api.active_count("a") == 0 and api.active_count("nobody") == 0


def test_submit_with_a_given_id_and_an_input_image(api: JobQueue, worker: JobQueue) -> None:
    image = bytes(range(256)) * 64
    api.submit(make_job(task="image-to-image", image=image), request_id="fixed-id")
    record = api.get("fixed-id")
    assert record is not None and record.job.task == "image-to-image"
    claimed = worker.claim("w1", timeout=0)
    assert claimed is not None and claimed.id == "fixed-id" and claimed.job.image == image


def test_input_images_are_read_only_by_the_worker_that_claims_the_job(
    backend: QueueBackend, api: JobQueue, worker: JobQueue
) -> None:
    image, mask, reference = b"\x89PNG image" * 1000, b"\x89PNG mask" * 500, b"\x89PNG reference" * 700
    job = make_job(
        task="edit-inpainting", variant="kontext", image=image, mask=mask, reference_image=reference
    )
    submitted = api.submit(job)
    plain = api.submit(make_job()).id
    # Neither the submit's record, nor a status poll, nor another process's read carries them.
    assert (submitted.job.image, submitted.job.mask, submitted.job.reference_image) == (None, None, None)
    for queue in (api, worker, backend.open("api")):
        for with_logs in (True, False):
            record = queue.get(submitted.id, with_logs=with_logs)
            assert record is not None and record.job.task == "edit-inpainting"
            assert record.job.variant == "kontext"
            assert (record.job.image, record.job.mask, record.job.reference_image) == (None, None, None)
    assert backend.input_rows() == {submitted.id: (image, mask, reference)}

    claimed = worker.claim("w1", timeout=0)
    assert claimed is not None and claimed.id == submitted.id
    assert (claimed.job.image, claimed.job.mask, claimed.job.reference_image) == (image, mask, reference)
    assert api.get(submitted.id).job.image is None  # the claim did not fill the API's cache
    # A job given back keeps its inputs for the next claim, on any handle.
    assert worker.requeue(submitted.id, "w1")
    again = backend.open("worker").claim("w2", timeout=0)
    assert again is not None and again.id == submitted.id and again.job.mask == mask
    assert again.job.reference_image == reference
    assert worker.claim("w1", timeout=0).job.image is None  # a text-to-image job: none
    assert api.get(plain).status is Status.IN_PROGRESS
    # Completing the job deletes them (no worker runs it again); so does any other way to
    # complete, e.g. cancelling a queued job.
    assert worker.complete(submitted.id, "w2", make_result())
    assert backend.input_rows() == {}
    cancelled = api.submit(make_job(task="image-to-image", image=image)).id
    assert set(backend.input_rows()) == {cancelled}
    assert api.cancel(cancelled) is CancelOutcome.CANCELLED
    assert backend.input_rows() == {}


def test_claim_takes_a_lease_and_renewal_needs_it(api: JobQueue, worker: JobQueue) -> None:
    rid = api.submit(make_job()).id
    claimed = worker.claim("w1", timeout=0)
    assert claimed is not None and claimed.id == rid
    assert claimed.status is Status.IN_PROGRESS and claimed.worker == "w1" and claimed.attempts == 1
    started = api.get(rid)
    assert started is not None and started.started_at is not None
    assert started.logs[0].message == "Started on w1"
    assert len(started.logs[0].timestamp) == len("2024-12-20T15:37:17.120314")

    assert worker.renew(rid, "w1")
    assert not worker.renew(rid, "someone-else")
    assert not worker.complete(rid, "someone-else", make_result())
    assert worker.complete(rid, "w1", make_result(seed=7))
    assert not worker.renew(rid, "w1")  # completed: nothing to hold


def test_a_blocked_claim_wakes_on_a_submit_from_another_handle(backend: QueueBackend) -> None:
    api, worker = backend.open("api"), backend.open("worker")
    claimed: list[object] = []
    thread = threading.Thread(target=lambda: claimed.append(worker.claim("w1", timeout=20)))
    thread.start()
    time.sleep(0.2)  # let the claim block first: this test is about being woken
    submitted_at = time.monotonic()
    rid = api.submit(make_job()).id
    thread.join(20)
    assert claimed and getattr(claimed[0], "id", None) == rid
    assert time.monotonic() - submitted_at < 2.0


def test_interrupt_claim_returns_a_blocked_claim_early(worker: JobQueue) -> None:
    started = time.monotonic()
    timer = threading.Timer(0.2, worker.interrupt_claim)
    timer.start()
    assert worker.claim("w1", timeout=20) is None
    assert time.monotonic() - started < 10
    timer.join()


def test_claims_from_several_handles_take_each_job_once(backend: QueueBackend) -> None:
    api = backend.open("api")
    ids = {record.id for record, _ in api.submit_many([make_job() for _ in range(40)])}
    handles = [backend.open("worker") for _ in range(3)]
    taken: list[list[str]] = [[] for _ in handles]

    def drain(slot: int) -> None:
        while (record := handles[slot].claim(f"w{slot}", timeout=0)) is not None:
            taken[slot].append(record.id)

    threads = [threading.Thread(target=drain, args=(slot,)) for slot in range(len(handles))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    flat = [rid for part in taken for rid in part]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))


def test_logs_progress_and_completion(api: JobQueue, worker: JobQueue) -> None:
    rid = api.submit(make_job()).id
    worker.claim("w1", timeout=0)
    worker.log(rid, "step 1/2", progress=0.5)
    worker.log(rid, "step 2/2")
    record = api.get(rid)
    assert record is not None and record.progress == 0.5
    assert [e.message for e in record.logs] == ["Started on w1", "step 1/2", "step 2/2"]
    assert api.get(rid, with_logs=False).logs == []

    assert worker.complete(rid, "w1", make_result(seed=7))
    done = api.get(rid)
    assert done.status is Status.COMPLETED and done.succeeded and done.result.seed == 7
    assert done.completed_at is not None and done.progress == 1.0
    assert not worker.complete(rid, "w1", make_result())  # a second completion is refused
    assert not worker.fail(rid, None, JobError(message="late", error_type="x"))


def test_complete_again_after_a_lost_acknowledgement_is_true_for_the_same_worker_and_result(
    api: JobQueue, worker: JobQueue
) -> None:
    """A worker that saw an exception from `complete` (its COMMIT may have been stored) calls it
    again: True means its result is the stored one, so it keeps its files; False means they are
    referenced by nothing and may be deleted."""
    rid = api.submit(make_job(webhook=HOOK)).id
    worker.claim("w1", timeout=0)
    result = make_result(seed=7, file_name="kept.jpg")
    assert worker.complete(rid, "w1", result)
    first = api.get(rid)
    delivery = api.delivery(rid)
    assert first is not None and delivery is not None

    assert worker.complete(rid, "w1", result)  # the retry: the same worker's same result
    again = api.get(rid)
    assert again is not None and again.completed_at == first.completed_at and again.result == result
    assert api.delivery(rid) == delivery  # nothing written twice
    assert not worker.complete(rid, "w2", result)  # another worker did not complete it
    assert not worker.complete(rid, "w1", make_result(seed=8, file_name="other.jpg"))  # not its result

    failed = api.submit(make_job()).id
    worker.claim("w1", timeout=0)
    assert worker.fail(failed, "w1", JobError(message="boom", error_type="internal_server_error"))
    assert not worker.complete(failed, "w1", result)  # failed: the result was never stored
    assert api.get(failed).result is None


def test_result_file_names_are_those_of_results_completed_since(api: JobQueue, worker: JobQueue) -> None:
    completed_at = []
    for n in range(3):
        rid = api.submit(make_job()).id
        worker.claim("w1", timeout=0)
        worker.complete(rid, "w1", make_result(file_name=f"f{n}.png"))
        completed_at.append(api.get(rid).completed_at)
        time.sleep(0.01)  # distinct completion times
    failed = api.submit(make_job()).id
    worker.claim("w1", timeout=0)
    worker.fail(failed, "w1", JobError(message="boom", error_type="internal_server_error"))
    api.submit(make_job())  # queued: no result yet

    assert api.result_file_names(0) == {"f0.png", "f1.png", "f2.png"}
    assert api.result_file_names(completed_at[1]) == {"f1.png", "f2.png"}
    assert api.result_file_names(completed_at[2] + 1) == set()


def test_a_worker_fails_only_what_it_holds_and_the_system_fails_anything(
    api: JobQueue, worker: JobQueue
) -> None:
    held = api.submit(make_job()).id
    queued = api.submit(make_job()).id
    worker.claim("w1", timeout=0)
    error = JobError(message="boom", error_type="internal_error")
    assert not worker.fail(held, "w2", error)
    assert worker.fail(held, "w1", error)
    assert api.get(held).error.message == "boom"
    assert api.fail(queued, None, error)
    assert api.get(queued).status is Status.COMPLETED and api.depth() == 0


def test_wait_for_change_wakes_on_a_log_from_another_handle(api: JobQueue, worker: JobQueue) -> None:
    rid = api.submit(make_job()).id
    worker.claim("w1", timeout=0)

    async def scenario() -> float:
        async def log_soon() -> None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(worker.log, rid, "step")

        task = asyncio.create_task(log_soon())
        started = time.monotonic()
        while True:
            record = await asyncio.to_thread(api.get, rid)
            if record is not None and record.logs[-1].message == "step":
                break
            await api.wait_for_change(rid, timeout=10)
        await task
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 5


def test_cancel_queued_running_completed_and_unknown(api: JobQueue, worker: JobQueue) -> None:
    running = api.submit(make_job()).id
    queued = api.submit(make_job()).id
    assert worker.claim("w1", timeout=0).id == running

    assert api.cancel(queued) is CancelOutcome.CANCELLED
    cancelled = api.get(queued)
    assert cancelled.status is Status.COMPLETED and cancelled.error.error_type == "request_cancelled"

    assert not worker.is_cancel_requested(running)
    assert api.cancel(running) is CancelOutcome.REQUESTED
    assert worker.is_cancel_requested(running)  # seen by the worker's own handle
    assert api.get(running).status is Status.IN_PROGRESS
    assert worker.fail(running, "w1", cancelled_error())  # the worker stops at its next step
    assert api.get(running).error.error_type == "request_cancelled"

    assert api.cancel(running) is CancelOutcome.ALREADY_COMPLETED
    assert api.cancel("unknown") is CancelOutcome.NOT_FOUND
    assert worker.claim("w1", timeout=0) is None  # the cancelled queued job never starts


def test_expired_lease_requeues_at_head_once_then_runner_disconnected(backend: QueueBackend) -> None:
    api = backend.open("api")
    worker = backend.open("worker", lease_seconds=0.2)
    rid = api.submit(make_job()).id
    other = api.submit(make_job()).id
    assert worker.claim("w1", timeout=0).id == rid
    assert api.recover_expired() == []  # the lease is still good
    assert eventually(api.recover_expired, what="the lease to run out") == [rid]
    record = api.get(rid)
    assert record.status is Status.IN_QUEUE and record.worker is None
    assert record.logs[-1].message == "Worker lost; retrying"
    assert api.position(rid) == 0 and api.position(other) == 1  # back at the head

    assert worker.claim("w2", timeout=0).id == rid
    assert not worker.complete(rid, "w1", make_result())  # the first worker lost its lease
    assert eventually(api.recover_expired, what="the second lease to run out") == [rid]
    failed = api.get(rid)
    assert failed.status is Status.COMPLETED and failed.attempts == 2
    assert failed.error.error_type == "runner_disconnected" and failed.error.status_code == 503
    assert api.recover_expired() == []


def test_release_worker_requeues_now_or_completes_a_cancelled_job(api: JobQueue, worker: JobQueue) -> None:
    rid = api.submit(make_job()).id
    assert worker.claim("w1", timeout=0).id == rid
    assert api.release_worker("w-other") == []
    assert api.release_worker("w1") == [rid]
    assert api.get(rid).status is Status.IN_QUEUE
    assert worker.claim("w2", timeout=0).id == rid
    api.cancel(rid)
    assert api.release_worker("w2") == [rid]
    assert api.get(rid).error.error_type == "request_cancelled"


def test_requeue_by_a_stopping_worker_does_not_count_an_attempt(api: JobQueue, worker: JobQueue) -> None:
    rid = api.submit(make_job()).id
    worker.claim("w1", timeout=0)
    assert not worker.requeue(rid, "w2")
    assert worker.requeue(rid, "w1")
    record = api.get(rid)
    assert record.status is Status.IN_QUEUE and record.attempts == 0 and record.worker is None


def test_start_deadline_fails_the_job_without_starting_it(api: JobQueue, worker: JobQueue) -> None:
    late = api.submit(make_job(start_deadline=time.time() - 1)).id
    fine = api.submit(make_job(start_deadline=time.time() + 60)).id
    assert worker.claim("w1", timeout=0).id == fine
    record = api.get(late)
    assert record.status is Status.COMPLETED and record.started_at is None
    assert record.error.error_type == "request_timeout" and record.error.status_code == 504

    expiring = api.submit(make_job(start_deadline=time.time() + 0.2)).id
    assert eventually(api.recover_expired, what="the start deadline") == [expiring]
    assert api.get(expiring).error.error_type == "request_timeout"


def test_a_delivery_row_is_written_with_every_completion_that_has_a_webhook(
    api: JobQueue, worker: JobQueue
) -> None:
    completed = api.submit(make_job(webhook=HOOK)).id
    no_hook = api.submit(make_job()).id
    cancelled = api.submit(make_job(webhook=HOOK)).id
    timed_out = api.submit(make_job(webhook=HOOK, start_deadline=time.time() + 0.2)).id
    refused = api.submit(make_job(webhook=HOOK)).id

    worker.claim("w1", timeout=0)
    assert api.delivery(completed) is None  # running: nothing to deliver yet
    worker.complete(completed, "w1", make_result())
    worker.claim("w1", timeout=0)
    worker.complete(no_hook, "w1", make_result())
    api.cancel(cancelled)
    eventually(api.recover_expired, what="the start deadline")
    assert worker.claim("w1", timeout=0).id == refused
    assert not worker.complete(refused, "w2", make_result())  # refused: no row either

    for rid in (completed, cancelled, timed_out):
        delivery = api.delivery(rid)
        assert delivery is not None and delivery.attempts == 0 and delivery.delivered_at is None
        assert abs(delivery.due_at - api.get(rid).completed_at) < 1
    assert api.delivery(no_hook) is None and api.delivery(refused) is None


def test_a_completion_and_its_delivery_row_are_seen_together(backend: QueueBackend) -> None:
    """Readers that poll while jobs complete never see a completed job without its row."""
    api, worker, reader = backend.open("api"), backend.open("worker"), backend.open("api")
    ids = [record.id for record, _ in api.submit_many([make_job(webhook=HOOK) for _ in range(20)])]
    stop = threading.Event()
    torn: list[str] = []

    def watch() -> None:
        while not stop.is_set():
            for rid in ids:
                # The job first: once its completion is visible, so must its row be.
                completed = reader.get(rid, with_logs=False).status is Status.COMPLETED
                if completed and reader.delivery(rid) is None:
                    torn.append(rid)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        for _ in ids:
            record = worker.claim("w1", timeout=0)
            assert record is not None and worker.complete(record.id, "w1", make_result())
    finally:
        stop.set()
        thread.join(30)
    assert torn == []
    assert all(api.delivery(rid) is not None for rid in ids)


def test_delivery_leases_hand_each_due_row_to_one_dispatcher(backend: QueueBackend) -> None:
    api, worker, other = backend.open("api"), backend.open("worker"), backend.open("api")
    ids = []
    for _ in range(3):
        rid = api.submit(make_job(webhook=HOOK)).id
        worker.claim("w1", timeout=0)
        worker.complete(rid, "w1", make_result())
        ids.append(rid)
    assert api.next_delivery_due() is not None

    now = time.time()
    first = api.lease_deliveries(now, limit=2, hold_until=now + 60)
    assert [d.request_id for d in first] == ids[:2] and all(d.attempts == 0 for d in first)
    second = other.lease_deliveries(now, limit=10, hold_until=now + 60)
    assert [d.request_id for d in second] == ids[2:]  # the leased rows are not handed out again
    assert other.lease_deliveries(now, limit=10, hold_until=now + 60) == []
    assert api.next_delivery_due() == now + 60

    api.delivery_succeeded(ids[0], attempts=1, now=now)
    api.delivery_failed(ids[1], attempts=1, error="HTTP 500", next_due_at=now - 1)
    other.delivery_failed(ids[2], attempts=10, error="HTTP 503", next_due_at=None)
    assert api.delivery(ids[0]).delivered_at == now and api.delivery(ids[0]).attempts == 1
    retried = api.delivery(ids[1])
    assert retried.last_error == "HTTP 500" and retried.attempts == 1 and not retried.gave_up
    assert api.delivery(ids[2]).gave_up and api.delivery(ids[2]).last_error == "HTTP 503"
    # Only the failed-but-retried row comes due again (its dispatcher died: same for a lease).
    again = other.lease_deliveries(time.time(), limit=10, hold_until=time.time() + 60)
    assert [(d.request_id, d.attempts) for d in again] == [(ids[1], 1)]
    api.delivery_succeeded(ids[1], attempts=2, now=time.time())
    assert api.next_delivery_due() is None


def test_concurrent_lease_calls_never_share_a_row(backend: QueueBackend) -> None:
    api, worker = backend.open("api"), backend.open("worker")
    ids = set()
    for record, _ in api.submit_many([make_job(webhook=HOOK) for _ in range(30)]):
        worker.claim("w1", timeout=0)
        worker.complete(record.id, "w1", make_result())
        ids.add(record.id)
    dispatchers = [backend.open("api") for _ in range(3)]
    leased: list[list[str]] = [[] for _ in dispatchers]

    def take(slot: int) -> None:
        while True:
            now = time.time()
            rows = dispatchers[slot].lease_deliveries(now, limit=2, hold_until=now + 60)
            if not rows:
                return
            leased[slot] += [row.request_id for row in rows]

    threads = [threading.Thread(target=take, args=(slot,)) for slot in range(len(dispatchers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    flat = [rid for part in leased for rid in part]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))


def test_wait_for_deliveries_wakes_on_a_completion_with_a_webhook(api: JobQueue, worker: JobQueue) -> None:
    rid = api.submit(make_job(webhook=HOOK)).id
    worker.claim("w1", timeout=0)

    async def scenario() -> float:
        async def complete_soon() -> None:
            await asyncio.sleep(0.2)
            await asyncio.to_thread(worker.complete, rid, "w1", make_result())

        task = asyncio.create_task(complete_soon())
        started = time.monotonic()
        await api.wait_for_deliveries(10)
        await task
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 5
    assert api.delivery(rid) is not None


def test_purge_deletes_old_completed_records_in_batches(
    backend: QueueBackend, api: JobQueue, worker: JobQueue
) -> None:
    done = []
    for n in range(5):
        rid = api.submit(make_job(webhook=HOOK, task="image-to-image", image=b"in")).id
        worker.claim("w1", timeout=0)
        worker.log(rid, "step")
        worker.complete(rid, "w1", make_result(file_name=f"f{n}.jpg"))
        done.append(rid)
    running = api.submit(make_job(task="image-to-image", image=b"running")).id
    worker.claim("w1", timeout=0)
    waiting = api.submit(make_job(task="image-to-image", image=b"waiting")).id

    assert api.purge(older_than=time.time() - 60) == []
    batches = [api.purge(older_than=time.time() + 1, limit=2) for _ in range(4)]
    assert [len(batch) for batch in batches] == [2, 2, 1, 0]
    purged = [record for batch in batches for record in batch]
    assert sorted(r.id for r in purged) == sorted(done)
    assert sorted(r.result.images[0].file_name for r in purged) == [f"f{n}.jpg" for n in range(5)]
    assert all(api.get(rid) is None and api.delivery(rid) is None for rid in done)
    # The inputs of what is purged are gone; those of jobs still to run are kept.
    assert backend.input_rows() == {running: (b"running", None, None), waiting: (b"waiting", None, None)}
    assert api.get(waiting).status is Status.IN_QUEUE and api.get(running).status is Status.IN_PROGRESS
    # A request id used again starts with no logs left over.
    api.submit(make_job(), request_id=done[0])
    assert api.get(done[0]).logs == []


def test_concurrent_purges_return_each_record_once(backend: QueueBackend) -> None:
    api, worker = backend.open("api"), backend.open("worker")
    ids = set()
    for record, _ in api.submit_many([make_job() for _ in range(30)]):
        worker.claim("w1", timeout=0)
        worker.complete(record.id, "w1", make_result())
        ids.add(record.id)
    purgers = [backend.open("api") for _ in range(3)]
    purged: list[list[str]] = [[] for _ in purgers]
    cutoff = time.time() + 1

    def purge(slot: int) -> None:
        while batch := purgers[slot].purge(cutoff, limit=3):
            purged[slot] += [record.id for record in batch]

    threads = [threading.Thread(target=purge, args=(slot,)) for slot in range(len(purgers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    flat = [rid for part in purged for rid in part]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))


def test_claims_and_renewals_are_the_workers_heartbeat(backend: QueueBackend) -> None:
    api, worker = backend.open("api"), backend.open("worker", lease_seconds=0.3)
    worker.set_worker_state("w1", "ready", device="cpu", model="tiny")
    (registered,) = api.workers()
    assert worker.claim("w1", timeout=0) is None  # an idle worker's poll
    eventually(
        lambda: worker.claim("w1", timeout=0) is None and api.workers()[0].updated_at > registered.updated_at,
        what="an idle claim to refresh the row",
    )
    rid = api.submit(make_job()).id
    assert worker.claim("w1", timeout=0).id == rid
    polled = api.workers()[0].updated_at
    eventually(
        lambda: worker.renew(rid, "w1") and api.workers()[0].updated_at > polled,
        what="a renewal to refresh the row",
    )
    assert api.workers()[0].state == "ready"  # a heartbeat keeps the state


def test_worker_registry(api: JobQueue, worker: JobQueue) -> None:
    worker.set_worker_state("w2", "loading", device="cpu", model="tiny")
    worker.set_worker_state("w1", "loading", device="cpu", model="tiny")
    before = time.time()
    worker.set_worker_state("w1", "ready", device="cuda:0", model="tiny", detail="ok")
    first, second = api.workers()
    assert (first.worker_id, first.state, first.device, first.detail) == ("w1", "ready", "cuda:0", "ok")
    assert first.pid == os.getpid() and first.updated_at >= before - 1
    assert (second.worker_id, second.state) == ("w2", "loading")
    api.remove_worker("w2")
    assert [w.worker_id for w in api.workers()] == ["w1"]
