"""Keyed submits (`JobQueue.store_once`) on every backend: one job per (tenant, key) within the
window, from any handle; another request under the key refused; tenants independent; keys
free again after the window or once their job was purged."""

from __future__ import annotations

import threading
import time

import pytest

from server.jobs import cancelled_error, new_request_id
from server.queue.base import JobQueue
from server.queue.idempotency import IdempotencyKey, IdempotencyMismatch
from tests.server.queue.conftest import QueueBackend, make_job


def key(name: str = "k1", body: str = "h1", tenant: str = "", window: float = 3600.0) -> IdempotencyKey:
    return IdempotencyKey(tenant=tenant, key=name, body_hash=body, window_seconds=window)


def test_a_repeat_returns_the_first_job_and_stores_nothing(backend: QueueBackend) -> None:
    first_api, second_api = backend.open("api"), backend.open("api")  # two API processes
    first = first_api.store_once(make_job(), new_request_id(), key())
    assert not first.repeated and first.position == 0
    repeat = second_api.store_once(make_job(prompt="same request"), new_request_id(), key())
    assert repeat.repeated and repeat.record.id == first.record.id and repeat.position == 0
    assert first_api.depth() == 1


def test_the_same_key_with_another_request_is_refused(api: JobQueue) -> None:
    api.store_once(make_job(), new_request_id(), key(body="h1"))
    with pytest.raises(IdempotencyMismatch, match="k1"):
        api.store_once(make_job(), new_request_id(), key(body="h2"))
    assert api.depth() == 1


def test_tenants_have_their_own_keys(api: JobQueue) -> None:
    ids = {
        api.store_once(make_job(tenant=t), new_request_id(), key(tenant=t or "")).record.id
        for t in ("a", None)
    }
    assert len(ids) == 2 and api.depth() == 2


def test_a_key_is_free_again_after_its_window(api: JobQueue) -> None:
    first = api.store_once(make_job(), new_request_id(), key(window=0.2))
    time.sleep(0.3)
    later = api.store_once(make_job(), new_request_id(), key(body="other", window=0.2))
    assert not later.repeated and later.record.id != first.record.id and api.depth() == 2


def test_a_key_whose_job_was_purged_is_free_again(api: JobQueue, worker: JobQueue) -> None:
    first = api.store_once(make_job(), new_request_id(), key())
    assert worker.claim("w1", timeout=0) is not None
    assert worker.fail(first.record.id, "w1", cancelled_error())
    assert len(api.purge(time.time() + 1)) == 1
    later = api.store_once(make_job(), new_request_id(), key())
    assert not later.repeated and later.record.id != first.record.id


def test_concurrent_submits_of_one_key_store_one_job(backend: QueueBackend) -> None:
    handles = [backend.open("api") for _ in range(4)]
    ids: list[str] = []
    barrier = threading.Barrier(len(handles))

    def submit(queue: JobQueue) -> None:
        barrier.wait()
        ids.append(queue.store_once(make_job(), new_request_id(), key()).record.id)

    threads = [threading.Thread(target=submit, args=(queue,)) for queue in handles]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(ids) == 4 and handles[0].depth() == 1
