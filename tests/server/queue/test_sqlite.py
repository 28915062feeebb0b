"""What only the SQLite backend has: the database file and its migrations, the counts
table, and AF_UNIX wake-ups between real processes. The behaviour every backend shares is in
test_contract.py."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.queue.base import CancelOutcome
from server.queue.sqlite import SQLiteQueue
from server.queue.sqlite.schema import SCHEMA_VERSION, schema_version
from tests.server.queue.conftest import make_job, make_result

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "queue.sqlite3", tmp_path / "run"


@pytest.fixture
def api(paths: tuple[Path, Path]) -> Iterator[SQLiteQueue]:
    queue = SQLiteQueue(*paths, role="api")
    yield queue
    queue.close()


@pytest.fixture
def worker(paths: tuple[Path, Path]) -> Iterator[SQLiteQueue]:
    queue = SQLiteQueue(*paths, role="worker", lease_seconds=30.0)
    yield queue
    queue.close()


def counted_ahead(queue: SQLiteQueue, rank: int) -> int:
    """What counting the rows says a new job of class `rank` would have ahead of it."""
    with contextlib.closing(queue.connect()) as conn:
        return conn.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'IN_QUEUE' AND priority_rank <= ?", (rank,)
        ).fetchone()[0]


def test_the_counts_table_agrees_with_the_rows_on_every_way_in_and_out(
    api: SQLiteQueue, worker: SQLiteQueue
) -> None:
    def check() -> None:
        for rank in (0, 1):
            assert api.submit_with_position(make_job(priority="low" if rank else "normal"))[1] == (
                counted_ahead(api, rank) - 1
            )
        assert api.depth() == counted_ahead(api, 1)

    low = api.submit(make_job(priority="low"))
    check()
    running = worker.claim("w1", timeout=0)
    check()
    assert worker.requeue(running.id, "w1")
    check()
    assert api.cancel(low.id) is CancelOutcome.CANCELLED
    check()
    running = worker.claim("w1", timeout=0)
    assert worker.complete(running.id, "w1", make_result())
    check()
    api.purge(older_than=time.time() + 1)
    check()


def test_counts_of_a_database_made_before_them_start_from_its_queued_jobs(paths: tuple[Path, Path]) -> None:
    first = SQLiteQueue(*paths, role="api")
    for priority in ("normal", "low", "low"):
        first.submit(make_job(priority=priority))
    with contextlib.closing(first.connect()) as conn:  # as a database made by an earlier version
        conn.execute("DROP TABLE queue_counts")
        for trigger in ("submit", "requeue", "leave", "delete"):
            conn.execute(f"DROP TRIGGER queue_counts_{trigger}")
        conn.execute("PRAGMA user_version = 0")
    first.close()
    reopened = SQLiteQueue(*paths, role="api")
    try:
        assert reopened.depth() == 3
        assert reopened.submit_with_position(make_job())[1] == 1
        assert reopened.submit_with_position(make_job(priority="low"))[1] == 4
    finally:
        reopened.close()


def test_a_database_of_an_earlier_version_is_migrated_in_place(paths: tuple[Path, Path]) -> None:
    db_path, run_dir = paths
    with contextlib.closing(sqlite3.connect(db_path)) as conn:  # before images had a column
        conn.execute(
            "CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, app_id TEXT NOT NULL, "
            "status TEXT NOT NULL, priority_rank INTEGER NOT NULL, job_json TEXT NOT NULL, "
            "created_at REAL NOT NULL, started_at REAL, completed_at REAL, attempts INTEGER NOT NULL "
            "DEFAULT 0, worker TEXT, lease_expires REAL, cancel_requested INTEGER NOT NULL DEFAULT 0, "
            "progress REAL NOT NULL DEFAULT 0, result_json TEXT, error_json TEXT, start_deadline REAL, "
            "webhook INTEGER NOT NULL DEFAULT 0)"
        )
        conn.execute(
            "INSERT INTO jobs (id, app_id, status, priority_rank, job_json, created_at) "
            "VALUES ('old', 'fal-ai/flux', 'IN_QUEUE', 0, ?, 1.0)",
            (make_job(prompt="from before").model_dump_json(),),
        )
        conn.commit()
    queue = SQLiteQueue(db_path, run_dir, role="api")
    try:
        with contextlib.closing(queue.connect()) as conn:
            assert schema_version(conn) == SCHEMA_VERSION
            indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        assert {"jobs_lease", "deliveries_due", "jobs_fair", "jobs_tenant_queue"} <= indexes
        assert {"image", "tenant", "fair_tag"} <= columns and "jobs_queue" not in indexes
        assert queue.get("old").job.prompt == "from before" and queue.depth() == 1
        image = bytes(range(256))
        queue.submit(make_job(task="image-to-image", image=image, tenant="b"))
        assert queue.claim("w1", timeout=0).id == "old"
        assert queue.claim("w1", timeout=0).job.image == image
    finally:
        queue.close()


def test_a_queue_opens_while_another_process_writes_the_new_database(paths: tuple[Path, Path]) -> None:
    """The switch to WAL is refused at once, without SQLite's busy handler, while another
    connection holds the write lock (the API and the workers open a new database together at
    start-up): the queue waits for the lock instead of failing."""
    db_path, run_dir = paths
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as other:
        other.execute("CREATE TABLE early (x)")  # a file in rollback-journal mode, as new ones are
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO early VALUES (1)")
        opened: list[SQLiteQueue] = []
        errors: list[BaseException] = []

        def open_queue() -> None:
            try:
                opened.append(SQLiteQueue(db_path, run_dir, role="worker"))
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=open_queue)
        thread.start()
        time.sleep(0.3)  # the fault lasts a while: the lock is held across the opening's first try
        assert not errors, errors
        other.execute("COMMIT")
        thread.join(30)
    assert not errors and len(opened) == 1
    try:
        with contextlib.closing(opened[0].connect()) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert schema_version(conn) == SCHEMA_VERSION
    finally:
        opened[0].close()


def test_jobs_queued_before_the_inputs_table_keep_their_images(paths: tuple[Path, Path]) -> None:
    """Schema v2 kept the image in the jobs row and the mask in the JSON: a claim after the
    upgrade still hands both to the worker, and a status poll shows neither."""
    db_path, run_dir = paths
    SQLiteQueue(db_path, run_dir, role="api").close()
    old_job = make_job(task="inpainting", mask=b"old mask")
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.execute(
            "INSERT INTO jobs (id, app_id, status, priority_rank, job_json, image, created_at) "
            "VALUES ('old', 'fal-ai/flux', 'IN_QUEUE', 0, ?, ?, 1.0)",
            (old_job.model_dump_json(), b"old image"),
        )
        conn.execute("UPDATE queue_counts SET queued = queued + 1 WHERE priority_rank = 0")
        conn.commit()
    queue = SQLiteQueue(db_path, run_dir, role="worker")
    try:
        assert (queue.get("old").job.image, queue.get("old").job.mask) == (None, None)
        claimed = queue.claim("w1", timeout=0)
        assert claimed.id == "old" and (claimed.job.image, claimed.job.mask) == (b"old image", b"old mask")
    finally:
        queue.close()


def test_an_inputs_table_from_before_the_reference_image_gets_its_column(paths: tuple[Path, Path]) -> None:
    """A schema v3 database (job_inputs without reference_image) with a queued inpainting job:
    opening it adds the column once (two processes opening it at once included), the old job
    keeps its image and mask, and a Kontext inpaint job stores and claims its reference."""
    db_path, run_dir = paths
    SQLiteQueue(db_path, run_dir, role="api").close()
    with contextlib.closing(sqlite3.connect(db_path)) as conn:  # back to the v3 inputs table
        conn.execute("DROP TABLE job_inputs")
        conn.execute("CREATE TABLE job_inputs (request_id TEXT PRIMARY KEY, image BLOB, mask BLOB)")
        conn.execute(
            "INSERT INTO jobs (id, app_id, status, priority_rank, job_json, created_at) "
            "VALUES ('old', 'fal-ai/flux-lora', 'IN_QUEUE', 0, ?, 1.0)",
            (make_job(task="inpainting").model_dump_json(),),
        )
        conn.execute("INSERT INTO job_inputs (request_id, image, mask) VALUES ('old', x'01', x'02')")
        conn.execute("UPDATE queue_counts SET queued = queued + 1 WHERE priority_rank = 0")
        conn.commit()
    opened: list[SQLiteQueue] = []
    threads = [threading.Thread(target=lambda: opened.append(SQLiteQueue(db_path, run_dir, role="api")))]
    threads += [threading.Thread(target=lambda: opened.append(SQLiteQueue(db_path, run_dir, role="worker")))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert len(opened) == 2
        with contextlib.closing(sqlite3.connect(db_path)) as conn:
            columns = [row[1] for row in conn.execute("PRAGMA table_info(job_inputs)")]
        assert columns == ["request_id", "image", "mask", "reference_image"]
        queue = opened[0]
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
        assert claimed.id == new and (claimed.job.image, claimed.job.mask, claimed.job.reference_image) == (
            b"i",
            b"m",
            b"r",
        )
    finally:
        for queue in opened:
            queue.close()


def test_records_survive_a_new_handle_and_images_stay_out_of_the_json(paths: tuple[Path, Path]) -> None:
    first = SQLiteQueue(*paths, role="api")
    rid = first.submit(make_job(task="image-to-image", image=bytes(range(256)) * 64)).id
    first.close()
    again = SQLiteQueue(*paths, role="api")
    try:
        assert again.claim("w1", timeout=0).job.image == bytes(range(256)) * 64
        with contextlib.closing(again.connect()) as conn:
            job_json, image = conn.execute("SELECT job_json, image FROM jobs WHERE id = ?", (rid,)).fetchone()
        assert len(job_json) < 2000 and image is None
    finally:
        again.close()


def test_the_maintenance_pass_takes_no_write_lock_when_nothing_is_due(
    paths: tuple[Path, Path], api: SQLiteQueue, worker: SQLiteQueue
) -> None:
    api.submit(make_job())
    worker.claim("w1", timeout=0)  # a live lease: nothing due
    with contextlib.closing(sqlite3.connect(paths[0], isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        assert api.recover_expired() == []
        assert time.monotonic() - started < 1.0  # it did not wait for the lock
        other.execute("ROLLBACK")


_CLAIMER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from server.queue.sqlite import SQLiteQueue

    queue = SQLiteQueue(Path(sys.argv[1]), Path(sys.argv[2]), role="worker")
    mode = sys.argv[3]
    print("ready", flush=True)
    if mode == "once":
        record = queue.claim("remote", timeout=10)
        print(time.time(), record.id if record else None, flush=True)
    else:
        timeout = 10.0  # the first job: wait for the test to submit
        while (record := queue.claim(mode, timeout=timeout)) is not None:
            print(record.id, flush=True)
            timeout = 0.5
    queue.close()
    """
)


def _start_claimer(paths: tuple[Path, Path], mode: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _CLAIMER, str(paths[0]), str(paths[1]), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout.readline().strip() == "ready"
    return process


def test_claim_is_atomic_across_processes(paths: tuple[Path, Path], api: SQLiteQueue) -> None:
    processes = [_start_claimer(paths, f"p{n}") for n in range(2)]
    ids = {api.submit(make_job()).id for _ in range(80)}
    # read through the same buffered pipe as `_start_claimer` (communicate() would skip
    # what readline() already buffered)
    outputs = [process.stdout.read() for process in processes]
    assert [process.wait(timeout=60) for process in processes] == [0, 0]
    flat = [rid for out in outputs for rid in out.split()]
    print("claims per process:", [len(out.split()) for out in outputs])
    assert len(flat) == len(set(flat)) == 80 and set(flat) == ids


def test_a_blocked_claim_in_another_process_wakes_within_milliseconds_of_submit(
    paths: tuple[Path, Path], api: SQLiteQueue
) -> None:
    process = _start_claimer(paths, "once")
    time.sleep(0.3)  # let it reach the blocking wait
    submitted_at = time.time()
    rid = api.submit(make_job()).id
    claimed_at, claimed_id = process.stdout.read().split()
    assert process.wait(timeout=20) == 0
    latency_ms = (float(claimed_at) - submitted_at) * 1000
    print(f"cross-process dispatch (submit -> claim returned): {latency_ms:.2f} ms")
    assert claimed_id == rid
    assert latency_ms < 100


def test_wait_for_change_wakes_on_log_from_a_worker(api: SQLiteQueue, worker: SQLiteQueue) -> None:
    rid = api.submit(make_job()).id
    worker.claim("w1", timeout=0)

    def step_later() -> None:
        time.sleep(0.2)
        worker.log(rid, "step 1/2", progress=0.5)

    async def wait() -> float:
        # the claim's own notification is already in the socket: consume it first
        await api.wait_for_change(rid, timeout=0.2)
        thread.start()
        began = time.monotonic()
        await api.wait_for_change(rid, timeout=5)
        return time.monotonic() - began

    thread = threading.Thread(target=step_later)
    waited = asyncio.run(wait())
    thread.join()
    assert 0.15 < waited < 0.45  # woken by the log line, not by the 0.5 s fallback
    assert api.get(rid).progress == 0.5


class CommitFailsOnce:
    """A connection whose next COMMIT fails as on a full disk, leaving its transaction open
    (SQLite may or may not roll back by itself after SQLITE_FULL)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.failed = False

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql == "COMMIT" and not self.failed:
            self.failed = True
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


def test_a_commit_that_fails_for_want_of_space_stores_nothing(api: SQLiteQueue) -> None:
    """The submit that saw the error is not stored later by the next commit on the connection."""
    faulty = CommitFailsOnce(api._conn())
    api._local.conn = faulty
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        api.submit(make_job(prompt="refused"))
    assert faulty.failed and not faulty.conn.in_transaction
    accepted = api.submit(make_job(prompt="accepted"))
    assert api.depth() == 1 and api.get(accepted.id) is not None
    prompts = [row[0] for row in faulty.conn.execute("SELECT json_extract(job_json, '$.prompt') FROM jobs")]
    assert prompts == ["accepted"]
