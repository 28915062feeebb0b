"""What only the PostgreSQL backend has: cheap positions in a long queue, migrations under an
advisory lock, LISTEN/NOTIFY wake-ups, clear start-up failures, and outages survived
without a restart. The behaviour every backend shares is in test_contract.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from server.jobs import Status
from server.queue.base import QueueUnavailable
from server.queue.postgres import PostgresQueue
from server.queue.postgres.schema import SCHEMA_VERSION
from tests.pg_server import PostgresServer, remove, start_postgres
from tests.server.queue.conftest import eventually, make_job, make_result


@pytest.fixture
def url(postgres_server: PostgresServer) -> str:
    return postgres_server.fresh_database_url()


@pytest.fixture
def api(url: str) -> Iterator[PostgresQueue]:
    queue = PostgresQueue(url, role="api")
    yield queue
    queue.close()


def test_positions_and_depth_stay_index_reads_at_ten_thousand_queued(url: str, api: PostgresQueue) -> None:
    for _ in range(10_000 // 500):
        api.submit_many([make_job() for _ in range(250)] + [make_job(priority="low") for _ in range(250)])
    last = api.submit(make_job(priority="low")).id
    first_normal = api.submit(make_job()).id
    assert api.depth() == 10_002
    assert api.position(first_normal) == 5_000 and api.position(last) == 10_001
    with psycopg.connect(url) as conn:
        conn.execute("ANALYZE flux_jobs")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN SELECT j.status, (SELECT count(*) FROM flux_jobs q WHERE q.status = 'IN_QUEUE' "
                "AND (q.priority_rank, q.seq) < (j.priority_rank, j.seq)) FROM flux_jobs j WHERE j.id = %s",
                (last,),
            )
        )
    assert "Seq Scan" not in plan and "flux_jobs_queue" in plan, plan
    started = time.perf_counter()
    for _ in range(20):
        api.position(first_normal)
    print(f"position at 5000 of 10000: {(time.perf_counter() - started) / 20 * 1000:.2f} ms")


def test_a_unix_socket_url_reaches_the_same_server(postgres_server: PostgresServer, url: str) -> None:
    database = url.rsplit("/", 1)[1]
    socket_url = f"postgresql://flux@/{database}?host={postgres_server.data}&port={postgres_server.port}"
    via_socket = PostgresQueue(socket_url, role="api")
    via_tcp = PostgresQueue(url, role="api")
    try:
        request_id = via_socket.submit(make_job()).id
        assert via_tcp.get(request_id) is not None
    finally:
        via_socket.close()
        via_tcp.close()


def test_boxes_starting_at_once_migrate_the_schema_once(url: str) -> None:
    queues: list[PostgresQueue] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            queues.append(PostgresQueue(url, role="api"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert errors == [] and len(queues) == 10
        with psycopg.connect(url) as conn:
            versions = [row[0] for row in conn.execute("SELECT version FROM flux_schema_version ORDER BY 1")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        queues[0].submit(make_job(), request_id="visible-everywhere")
        assert all(queue.get("visible-everywhere") is not None for queue in queues)
    finally:
        for queue in queues:
            queue.close()


def test_a_job_queued_by_the_release_before_the_inputs_table_keeps_its_images(url: str) -> None:
    """Schema v1 kept the image in the jobs row and the mask in the JSON: after the upgrade
    (a box still on that release may keep submitting so), a claim hands both to the worker."""
    from server.queue.postgres import schema

    with psycopg.connect(url) as conn:  # the database as the earlier release left it
        conn.execute("CREATE TABLE flux_schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ)")
        conn.execute(schema.MIGRATIONS[0])
        conn.execute("INSERT INTO flux_schema_version (version) VALUES (1)")
        conn.execute(
            "INSERT INTO flux_jobs (id, app_id, status, priority_rank, job_json, image, created_at) "
            "VALUES ('old', 'fal-ai/flux', 'IN_QUEUE', 0, %s, %s, 1.0)",
            (make_job(task="inpainting", mask=b"old mask").model_dump_json(), b"old image"),
        )
    queue = PostgresQueue(url, role="worker")
    try:
        assert (queue.get("old").job.image, queue.get("old").job.mask) == (None, None)
        claimed = queue.claim("w1", timeout=0)
        assert claimed.id == "old" and (claimed.job.image, claimed.job.mask) == (b"old image", b"old mask")
    finally:
        queue.close()


def test_the_inputs_table_of_schema_v2_gets_the_reference_image_column(url: str) -> None:
    """A database the previous release left at v2: the upgrade adds the column (idempotent: the
    statement is safe to run again), and a Kontext inpaint job stores and claims its reference."""
    from server.queue.postgres import schema

    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE flux_schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ)")
        for version, script in enumerate(schema.MIGRATIONS[:2], start=1):
            conn.execute(script)
            conn.execute("INSERT INTO flux_schema_version (version) VALUES (%s)", (version,))
        conn.execute(
            "INSERT INTO flux_jobs (id, app_id, status, priority_rank, job_json, created_at) "
            "VALUES ('old', 'fal-ai/flux-lora', 'IN_QUEUE', 0, %s, 1.0)",
            (make_job(task="inpainting").model_dump_json(),),
        )
        conn.execute("INSERT INTO flux_job_inputs (request_id, image, mask) VALUES ('old', '\\x01', '\\x02')")
    queue = PostgresQueue(url, role="worker")
    try:
        with psycopg.connect(url) as conn:
            conn.execute(schema.MIGRATIONS[2])  # again: a no-op
            columns = [
                row[0]
                for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'flux_job_inputs' ORDER BY ordinal_position"
                )
            ]
        assert columns == ["request_id", "image", "mask", "reference_image"]
        new = queue.submit(
            make_job(task="edit-inpainting", variant="kontext", image=b"i", mask=b"m", reference_image=b"r")
        ).id
        old = queue.claim("w1", timeout=0)
        assert old.id == "old" and (old.job.image, old.job.mask, old.job.reference_image) == (
            b"\x01",
            b"\x02",
            None,
        )
        claimed = queue.claim("w1", timeout=0)
        assert claimed.id == new
        assert (claimed.job.image, claimed.job.mask, claimed.job.reference_image) == (b"i", b"m", b"r")
    finally:
        queue.close()


@pytest.mark.parametrize(
    ("mangle", "cause"),
    [
        (lambda server: server.url(password="wrong"), "password authentication failed"),
        (
            lambda server: server.url(database="no_such_database"),
            'database "no_such_database" does not exist',
        ),
        (lambda server: server.url().replace(f":{server.port}/", ":1/"), "refused"),
    ],
    ids=["wrong-password", "missing-database", "nobody-listening"],
)
def test_a_server_that_cannot_be_used_fails_fast_with_one_line(
    postgres_server: PostgresServer, mangle, cause
) -> None:
    started = time.monotonic()
    with pytest.raises(QueueUnavailable) as raised:
        PostgresQueue(mangle(postgres_server), role="api")
    message = str(raised.value)
    assert time.monotonic() - started < 10
    assert "\n" not in message and "127.0.0.1:" in message and cause in message, message
    assert "flux-test-password" not in message and "wrong" not in message.split(":")[0]


def test_a_submit_wakes_a_blocked_claim_on_another_handle_by_notify(url: str, api: PostgresQueue) -> None:
    worker = PostgresQueue(url, role="worker")
    try:
        worker.wakeups.start()
        claimed: list[float] = []
        thread = threading.Thread(
            target=lambda: claimed.append(time.monotonic()) if worker.claim("w1", 20) else None
        )
        thread.start()
        time.sleep(0.3)  # the claim is blocked in its wait: this test is about being woken
        submitted = time.monotonic()
        api.submit(make_job())
        thread.join(20)
        assert claimed and claimed[0] - submitted < 0.5  # the fallback poll is 2 s
    finally:
        worker.close()


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A server of this module's own, which its tests stop and start."""
    server = start_postgres(tmp_path_factory.mktemp("postgres-outage"))
    yield server
    remove(server)


def test_an_outage_answers_unavailable_then_everything_reconnects(
    own_server: PostgresServer, tmp_path: Path
) -> None:
    url = own_server.fresh_database_url()
    api = PostgresQueue(url, role="api")
    worker = PostgresQueue(url, role="worker", lease_seconds=30)
    try:
        queued = api.submit(make_job()).id
        running = api.submit(make_job()).id
        assert worker.claim("w1", timeout=0).id == queued
        own_server.stop()
        started = time.monotonic()
        with pytest.raises(QueueUnavailable):
            api.get(queued)
        assert time.monotonic() - started < 8  # an answer, not a hang

        # A worker's handle fails fast too: the worker process waits out an outage itself,
        # with backoff (server/worker; tests/server/worker/test_database_outage.py).
        started = time.monotonic()
        with pytest.raises(QueueUnavailable):
            worker.log(queued, "step during the outage")
        assert time.monotonic() - started < 8
        own_server.start()
        eventually(lambda: _get_or_none(api, queued), timeout=15, what="the API to reconnect")
        worker.log(queued, "step after the outage")
        assert api.get(queued).logs[-1].message == "step after the outage"
        assert worker.renew(queued, "w1") and worker.complete(queued, "w1", make_result())
        assert api.get(running).status is Status.IN_QUEUE  # nothing queued was lost

        # Wake-ups reconnected too: a blocked claim is woken by the next submit.
        claimed: list[str] = []
        thread = threading.Thread(target=lambda: claimed.append(getattr(worker.claim("w1", 20), "id", "")))
        thread.start()
        eventually(lambda: worker.wakeups._listening.is_set(), timeout=15, what="the listener")
        assert claimed == [] or claimed == [running]
        thread.join(20)
        assert claimed == [running]
    finally:
        api.close()
        worker.close()


def _get_or_none(queue: PostgresQueue, request_id: str):
    try:
        return queue.get(request_id)
    except QueueUnavailable:
        return None


def test_a_completion_whose_commit_acknowledgement_is_lost_answers_true_when_retried(
    url: str, api: PostgresQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server commits, the connection breaks before the client hears it: the worker's
    call raises (its outcome is unknown), and the retry the worker makes finds its own result
    stored and answers True (before, False: the worker then deleted the images of a job it
    did complete)."""
    worker = PostgresQueue(url, role="worker")
    try:
        rid = api.submit(make_job()).id
        assert worker.claim("w1", timeout=0) is not None
        commit = psycopg.Transaction.__exit__
        lost: list[str] = []

        def commit_then_lose_the_acknowledgement(self: psycopg.Transaction, *exc_info: object) -> bool:
            answer = commit(self, *exc_info)
            if not lost and exc_info[0] is None:
                lost.append(rid)
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return answer

        monkeypatch.setattr(psycopg.Transaction, "__exit__", commit_then_lose_the_acknowledgement)
        result = make_result(seed=3, file_name="mine.png")
        with pytest.raises(QueueUnavailable):
            worker.complete(rid, "w1", result)
        assert lost == [rid]  # the first commit's answer was lost
        assert worker.complete(rid, "w1", result)
        record = api.get(rid)
        assert record is not None and record.status is Status.COMPLETED and record.result == result
    finally:
        worker.close()
