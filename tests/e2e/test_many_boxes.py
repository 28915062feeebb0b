"""Two boxes on one PostgreSQL queue, driven with the real fal_client.

Each box is a real `flux-server serve` (its own data directory, port and worker) with
`--queue-url` on one database and `--files-dir` on one shared folder, as two GPU boxes on a
studio's network would be. Both boxes share this module's PostgreSQL server, which one test
restarts; box B is killed (its whole process group) and started again by another.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from e2e_support import APP, BLOCKER_INPUT, DEV, cancel, small_input, submit, wait_completed, wait_for

from server.config import Settings
from server.queue.base import JobQueue
from server.queue.factory import open_queue
from server.tls import CertPaths
from tests.conftest import REPO, FluxServer, free_port, server_env
from tests.pg_server import PostgresServer, remove, start_postgres

pytestmark = pytest.mark.timeout(300)

LEASE_SECONDS = "3"  # a killed box's job is retried within seconds


@dataclass
class Boxes:
    a: FluxServer
    b: FluxServer
    postgres: PostgresServer
    url: str
    files: Path
    queue: JobQueue  # the test's own handle, to read what the boxes wrote
    start_b: object  # () -> FluxServer: box B again, on its data directory

    def box_of(self, request_id: str) -> str:
        """The worker that ran (or runs) a request, from its "Started on" log line."""
        record = self.queue.get(request_id)
        assert record is not None
        started = [e.message for e in record.logs if e.message.startswith("Started on ")]
        return started[-1].removeprefix("Started on ")


def start_box(
    data_dir: Path,
    *,
    url: str,
    files: Path | None,
    tiny_model_dir: Path,
    certs: CertPaths,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> FluxServer:
    """`flux-server serve` in a session of its own, so that a test can kill its process group.
    `files`: the shared files folder (None: each box its own, as with object storage)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / tiny_model_dir.name
    if not link.exists():
        link.symlink_to(tiny_model_dir, target_is_directory=True)
    port = free_port()
    argv = [
        sys.executable, "-m", "server.supervisor.cli", "serve", "--model", "tiny", "--workers", "1",
        "--data-dir", str(data_dir), "--port", str(port), "--queue-url", url,
        "--lease-seconds", LEASE_SECONDS, "--webhook-retry-base-seconds", "0.2",
        "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
    ]  # fmt: skip
    argv += ["--files-dir", str(files)] if files is not None else []
    argv += list(args)
    log_path = data_dir / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=server_env(env), cwd=REPO, start_new_session=True
        )
    box = FluxServer(
        base_url=f"https://127.0.0.1:{port}",
        port=port,
        data_dir=data_dir,
        process=process,
        log_path=log_path,
        certs=certs,
    )
    try:
        box.wait_healthy()
    except BaseException:
        kill_box(box)
        raise
    return box


def kill_box(box: FluxServer) -> None:
    """kill -9 of the box's whole process group: supervisor, API and worker at once."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(box.process.pid, signal.SIGKILL)
    box.process.wait(30)


@pytest.fixture(scope="module")
def boxes(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, certs: CertPaths
) -> Iterator[Boxes]:
    root = tmp_path_factory.mktemp("boxes")
    postgres = start_postgres(root / "postgres")
    url = postgres.fresh_database_url()
    files = root / "shared-files"
    files.mkdir()

    def start(name: str) -> FluxServer:
        return start_box(root / name, url=url, files=files, tiny_model_dir=tiny_model_dir, certs=certs)

    a = start("box-a")
    b = start("box-b")
    queue = open_queue(Settings(data_dir=root / "observer", queue_url=url), role="test")
    state = Boxes(
        a=a, b=b, postgres=postgres, url=url, files=files, queue=queue, start_b=lambda: start("box-b")
    )
    try:
        yield state
    finally:
        queue.close()
        for box in (state.a, state.b):
            with contextlib.suppress(AssertionError):
                box.stop(timeout=30)
        remove(postgres)


@pytest.fixture(scope="module")
def fal_at(boxes: Boxes, certs: CertPaths) -> Iterator[Callable[[FluxServer], Any]]:
    """`fal_at(box)`: a real fal_client.SyncClient whose next submit or handle goes to `box`
    (fal_client builds its URLs from module-level formats at call time)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(certs.bundle))
        import fal_client
        import fal_client.client

        def at(box: FluxServer) -> Any:
            patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://127.0.0.1:{box.port}/")
            patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"https://127.0.0.1:{box.port}/run/")
            return fal_client.SyncClient(key="anything")

        yield at


def worker_id(box: FluxServer) -> str:
    return f"{box.health().json()['box']}-w0"


@contextlib.contextmanager
def both_workers_busy(boxes: Boxes) -> Iterator[dict[str, str]]:
    """Two blockers, one per box's worker: yields {worker id: blocker id}; cancels them after."""
    with boxes.a.client() as client:
        blockers = [submit(client, DEV, BLOCKER_INPUT)["request_id"] for _ in range(2)]
        for request_id in blockers:
            wait_for(client, request_id, lambda s: s["status"] == "IN_PROGRESS", timeout=60)
        try:
            yield {boxes.box_of(request_id): request_id for request_id in blockers}
        finally:
            for request_id in blockers:
                cancel(client, request_id)
            for request_id in blockers:
                wait_completed(client, request_id, timeout=60)


def test_health_on_either_box_lists_both_boxes_workers_and_the_depth(boxes: Boxes) -> None:
    a, b = boxes.a.health().json(), boxes.b.health().json()
    assert a["box"] != b["box"] and a["queue"] == b["queue"] == "postgresql"
    ids = {w["id"] for w in a["workers"]}
    assert ids == {w["id"] for w in b["workers"]} == {f"{a['box']}-w0", f"{b['box']}-w0"}
    assert all(w["state"] == "ready" for w in a["workers"]) and a["queue_depth"] == b["queue_depth"] == 0


def test_submitted_on_a_runs_on_b_and_either_box_serves_it(boxes: Boxes, fal_at) -> None:
    worker_b = worker_id(boxes.b)
    with both_workers_busy(boxes) as busy:
        with boxes.a.client() as client:
            cancel(client, busy[worker_b])  # only box B's worker becomes free
        handle = fal_at(boxes.a).submit(DEV, small_input(seed=11))
        on_b = fal_at(boxes.b).get_handle(DEV, handle.request_id)
        events = list(on_b.iter_events(with_logs=True))  # the SSE stream, from box B
        assert type(events[-1]).__name__ == "Completed"
        result_b = on_b.get()
        on_a = fal_at(boxes.a).get_handle(DEV, handle.request_id)
        result_a = on_a.get()
        # The same result; each box links the image on its own address.
        assert result_a["images"][0]["url"] == result_b["images"][0]["url"].replace(
            boxes.b.base_url, boxes.a.base_url
        )
        assert {**result_a, "images": None} == {**result_b, "images": None}
        final = on_a.status(with_logs=True)
        assert f"Started on {worker_b}" in [log["message"] for log in final.logs]
    assert boxes.box_of(handle.request_id) == worker_b
    # The image lives in the shared files folder: each box serves it.
    url = result_b["images"][0]["url"]
    name = url.rsplit("/", 1)[-1]
    assert (boxes.files / name).is_file()
    for box in (boxes.a, boxes.b):
        with box.client() as client:
            assert client.get(f"/files/{name}").status_code == 200


def test_a_job_on_a_killed_box_completes_on_the_other(boxes: Boxes) -> None:
    worker_a, worker_b = worker_id(boxes.a), worker_id(boxes.b)
    with both_workers_busy(boxes) as busy, boxes.a.client() as client:
        cancel(client, busy[worker_b])
        long_job = submit(client, DEV, {**BLOCKER_INPUT, "prompt": "survivor", "num_inference_steps": 6})
        request_id = long_job["request_id"]
        wait_for(client, request_id, lambda s: s["status"] == "IN_PROGRESS", timeout=60)
        assert boxes.box_of(request_id) == worker_b
        kill_box(boxes.b)
        cancel(client, busy[worker_a])  # box A's worker is free to take it over
        done = wait_completed(client, request_id, timeout=120)
        messages = [log["message"] for log in done["logs"]]
        assert "Worker lost; retrying" in messages and messages.count(f"Started on {worker_a}") == 1
        result = client.get(f"/{APP}/requests/{request_id}")
        assert result.status_code == 200 and result.json()["prompt"] == "survivor"
    boxes.b = boxes.start_b()  # type: ignore[operator]
    assert boxes.b.health().status_code == 200


def test_a_postgres_restart_with_twenty_queued_loses_none(boxes: Boxes) -> None:
    with both_workers_busy(boxes), boxes.a.client() as client:
        ids = [submit(client, DEV, small_input(seed=n))["request_id"] for n in range(20)]
        assert client.get("/health").json()["queue_depth"] == 20
        boxes.postgres.stop()
        try:
            down = client.get(f"/{APP}/requests/{ids[0]}/status")
            assert down.status_code == 503 and "detail" in down.json()
        finally:
            boxes.postgres.start()
        deadline = time.monotonic() + 30  # the API reconnects by itself
        while client.get(f"/{APP}/requests/{ids[0]}/status").status_code == 503:
            assert time.monotonic() < deadline, "box A did not reconnect"
            time.sleep(0.2)
    # both_workers_busy cancelled its blockers after the restart: cancels reached the workers.
    with boxes.b.client() as client:
        outputs = [wait_completed(client, request_id, timeout=120) for request_id in ids]
    assert all(o["status"] == "COMPLETED" and "error" not in o for o in outputs)
    for request_id in ids:
        result = boxes.queue.get(request_id)
        assert result is not None and result.succeeded
        assert sum(e.message.startswith("Started on ") for e in result.logs) == 1


def test_two_hundred_submits_over_both_boxes_each_run_exactly_once(boxes: Boxes) -> None:
    def submit_on(box: FluxServer, count: int) -> list[str]:
        with box.client() as client:
            return [
                submit(client, DEV, small_input(seed=n, num_inference_steps=1))["request_id"]
                for n in range(count)
            ]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda args: submit_on(*args), [(boxes.a, 50), (boxes.b, 50)] * 2))
    ids = [request_id for part in parts for request_id in part]
    assert len(ids) == len(set(ids)) == 200
    deadline = time.monotonic() + 240
    while not all((r := boxes.queue.get(i, with_logs=False)) and r.completed_at for i in ids):
        assert time.monotonic() < deadline, "the 200 jobs did not all complete"
        time.sleep(0.5)
    runs: dict[str, int] = {}
    for request_id in ids:
        record = boxes.queue.get(request_id)
        assert record is not None and record.succeeded, request_id
        starts = [e.message for e in record.logs if e.message.startswith("Started on ")]
        assert len(starts) == 1 and record.attempts == 1, (request_id, starts)
        runs[starts[0]] = runs.get(starts[0], 0) + 1
    assert sum(runs.values()) == 200 and len(runs) == 2  # both boxes' workers took part


def test_a_webhook_is_delivered_once_by_the_two_boxes(boxes: Boxes) -> None:
    calls: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            calls.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        hook = quote(f"http://127.0.0.1:{receiver.server_address[1]}/hook", safe="")
        with boxes.a.client() as client:
            response = client.post(f"/{DEV}?fal_webhook={hook}", json=small_input(seed=5))
            request_id = response.json()["request_id"]
        deadline = time.monotonic() + 60
        while (delivery := boxes.queue.delivery(request_id)) is None or delivery.delivered_at is None:
            assert time.monotonic() < deadline, "the webhook was not delivered"
            time.sleep(0.1)
        with boxes.b.client() as client:  # the delivery's log line, seen from the other box
            done = wait_for(
                client, request_id, lambda s: any(log["message"].startswith("Webhook") for log in s["logs"])
            )
        messages = [log["message"] for log in done["logs"] if log["message"].startswith("Webhook")]
        assert messages == ["Webhook delivered (attempt 1)"]
        assert len(calls) == 1 and json.loads(calls[0])["request_id"] == request_id
    finally:
        receiver.shutdown()
        receiver.server_close()


def test_a_box_started_again_keeps_its_worker_id(boxes: Boxes) -> None:
    """Box B was killed and started again (an earlier test): each box's worker shows once."""
    workers = [w["id"] for w in boxes.a.health().json()["workers"]]
    assert sorted(workers) == sorted({worker_id(boxes.a), worker_id(boxes.b)})
