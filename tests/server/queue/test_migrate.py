"""`flux-server migrate-queue`: a one-box SQLite queue copied into PostgreSQL, order, results,
logs and webhook rows included, and safe to run twice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg

from server.jobs import Status, Webhook, new_request_id
from server.queue.idempotency import IdempotencyKey
from server.queue.postgres import PostgresQueue
from server.queue.sqlite import SQLiteQueue
from tests.pg_server import PostgresServer
from tests.server.queue.conftest import make_job, make_result

REPO = Path(__file__).resolve().parents[3]


def migrate(data_dir: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server.supervisor.cli",
            "migrate-queue",
            "--data-dir",
            str(data_dir),
            "--queue-url",
            url,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_queued_and_finished_requests_move_across_once(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    sqlite = SQLiteQueue(data_dir / "queue.sqlite3", data_dir / "run", role="api")
    hook = Webhook(url="https://example.test/hook", kind="fal")
    done = sqlite.submit(make_job(webhook=hook, prompt="finished")).id
    sqlite.claim("w0", timeout=0)
    sqlite.log(done, "step 1/2", progress=0.5)
    sqlite.complete(done, "w0", make_result(seed=42))
    low = sqlite.submit(make_job(priority="low", prompt="low", tenant="team-b")).id
    normal = sqlite.submit(
        make_job(
            prompt="normal",
            image=b"\x89PNG-bytes",
            mask=b"mask-bytes",
            reference_image=b"reference-bytes",
            task="edit-inpainting",
            variant="kontext",
        )
    ).id
    crashed = sqlite.submit(make_job(prompt="was running")).id
    key = IdempotencyKey(tenant="", key="k1", body_hash="h", window_seconds=3600)
    later = sqlite.store_once(make_job(prompt="later"), new_request_id(), key).record.id
    assert sqlite.claim("w0", timeout=0).id == normal
    sqlite.requeue(normal, "w0")  # as `serve` does when it stops
    assert sqlite.claim("w0", timeout=0).id == normal
    assert sqlite.claim("w0", timeout=0).id == crashed  # left running, as after a crash
    sqlite.requeue(normal, "w0")
    sqlite_usage = sqlite.usage()
    assert [row.requests for row in sqlite_usage] == [1]
    sqlite.close()

    url = postgres_server.fresh_database_url()
    first = migrate(data_dir, url)
    assert first.returncode == 0, first.stderr
    assert (
        first.stdout.startswith("copied 4 queued and 1 finished request(s)")
        and "0 already there" in first.stdout
    )
    again = migrate(data_dir, url)
    assert again.returncode == 0 and "copied 0 queued and 0 finished" in again.stdout
    assert "5 already there" in again.stdout

    queue = PostgresQueue(url, role="api")
    try:
        finished = queue.get(done)
        assert finished.status is Status.COMPLETED and finished.result.seed == 42
        assert [e.message for e in finished.logs] == ["Started on w0", "step 1/2"]
        assert queue.delivery(done) is not None and queue.delivery(done).delivered_at is None
        assert queue.get(normal).job.image is None  # inputs are read by a claim only
        # The same claim order (normal ones first, FIFO, then low); the job left running goes
        # to the head, as a lost worker's job does.
        assert [queue.position(i) for i in (crashed, normal, later, low)] == [0, 1, 2, 3]
        assert queue.get(crashed).status is Status.IN_QUEUE and queue.get(crashed).worker is None
        assert queue.depth() == 4
        with psycopg.connect(url) as conn:  # the tenant column, which fair share reads, came along
            tenant = conn.execute("SELECT tenant FROM flux_jobs WHERE id = %s", (low,)).fetchone()
        assert tenant == ("team-b",)
        # Usage (here the finished request's) and the Idempotency-Key rows came along once.
        assert queue.usage() == sqlite_usage
        assert queue.store_once(make_job(), new_request_id(), key).record.id == later
        assert queue.claim("box-w0", timeout=0).id == crashed
        claimed = queue.claim("box-w0", timeout=0)
        assert claimed.id == normal
        assert (claimed.job.image, claimed.job.mask) == (b"\x89PNG-bytes", b"mask-bytes")
        assert claimed.job.reference_image == b"reference-bytes" and claimed.job.variant == "kontext"
    finally:
        queue.close()


def test_without_a_database_it_says_so(tmp_path: Path, postgres_server: PostgresServer) -> None:
    result = migrate(tmp_path / "empty", postgres_server.fresh_database_url())
    assert result.returncode == 2 and "no queue database at" in result.stderr
