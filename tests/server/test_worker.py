"""The worker loop against the real tiny runtime: in a thread, and as `flux-server worker`
processes that are killed (SIGKILL) and stopped (SIGTERM) mid-job."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from server.config import Settings
from server.jobs import Job, JobRecord, Status
from server.queue.base import CancelOutcome, JobQueue
from server.queue.factory import open_queue
from server.storage import LocalStorage
from server.worker import Worker

REPO = Path(__file__).resolve().parents[2]


def wait_until(condition: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def make_data_dir(root: Path, tiny_model_dir: Path) -> Path:
    """A data directory that finds the session's tiny model without rebuilding it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / tiny_model_dir.name).symlink_to(tiny_model_dir, target_is_directory=True)
    return root


def completed(queue: JobQueue, request_id: str) -> Callable[[], JobRecord | None]:
    def check() -> JobRecord | None:
        record = queue.get(request_id)
        return record if record is not None and record.status is Status.COMPLETED else None

    return check


def job(**overrides: object) -> Job:
    return Job(
        **{"prompt": "a red fox", "width": 64, "height": 48 + 16, "num_inference_steps": 3, **overrides}
    )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[JobQueue, Settings]]:
    """One in-thread worker on the tiny model, shared by the tests of this module."""
    data_dir = make_data_dir(tmp_path_factory.mktemp("worker") / "data", tiny_model_dir)
    settings = Settings(model="tiny", data_dir=data_dir, device="cpu", lease_seconds=30.0)
    api = open_queue(settings, role="api")
    worker = Worker(settings, worker_id="thread-worker")
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(worker.run()), daemon=True)
    thread.start()
    wait_until(lambda: any(w.state == "ready" for w in api.workers()), 300, "the worker to be ready")
    yield api, settings
    worker.stop()
    thread.join(timeout=60)
    assert exit_codes == [0]
    assert [w.state for w in api.workers()] == ["stopped"]
    api.close()


def test_a_job_completes_with_a_stored_image_and_step_logs(served: tuple[JobQueue, Settings]) -> None:
    api, settings = served
    rid = api.submit(job(output_format="png", width=80, height=64, seed=3)).id
    record = wait_until(completed(api, rid), what="the job")
    assert record.error is None, record.error
    (image,) = record.result.images
    assert (image.width, image.height, image.content_type) == (80, 64, "image/png")
    path = LocalStorage(settings.files_dir).path(image.file_name)
    assert path is not None and path.stat().st_size == image.file_size
    with Image.open(path) as stored:
        assert stored.format == "PNG" and stored.size == (80, 64)
    messages = [entry.message for entry in record.logs]
    assert messages[0] == "Started on thread-worker"
    assert [m for m in messages if m.startswith("step ")] == ["step 1/3", "step 2/3", "step 3/3"]
    assert messages[-1].startswith("Generated 1 image(s) in ") and messages[-1].endswith("(preset none)")
    assert record.result.seed == 3 and record.result.timings["inference"] > 0 and record.progress == 1.0


def test_inline_images_are_data_uris_and_nothing_is_stored(served: tuple[JobQueue, Settings]) -> None:
    api, settings = served
    before = set(settings.files_dir.iterdir())
    rid = api.submit(job(inline_images=True, num_images=2)).id
    record = wait_until(completed(api, rid), what="the job")
    assert [img.file_name for img in record.result.images] == [None, None]
    uri = record.result.images[0].data_uri
    assert uri.startswith("data:image/jpeg;base64,")
    import base64

    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as decoded:
        assert decoded.format == "JPEG" and decoded.size == (64, 64)
    assert set(settings.files_dir.iterdir()) == before


def test_bad_input_fails_with_a_422_and_the_worker_keeps_serving(
    served: tuple[JobQueue, Settings],
) -> None:
    api, _ = served
    bad = api.submit(job(width=65)).id  # not a multiple of 16: the runtime refuses it
    good = api.submit(job()).id
    record = wait_until(completed(api, bad), what="the bad job")
    assert record.error.status_code == 422
    assert record.error.body["detail"][0]["loc"] == ["body"] and "65" in record.error.body["detail"][0]["msg"]
    assert wait_until(completed(api, good), what="the next job").succeeded


def test_cancel_stops_a_running_job_at_its_next_step(served: tuple[JobQueue, Settings]) -> None:
    api, _ = served
    rid = api.submit(job(num_inference_steps=50)).id
    wait_until(lambda: (r := api.get(rid)) is not None and r.progress > 0, what="the first step")
    assert api.cancel(rid) is CancelOutcome.REQUESTED
    record = wait_until(completed(api, rid), what="the cancelled job")
    assert record.error.error_type == "request_cancelled" and record.result is None
    steps = [e.message for e in record.logs if e.message.startswith("step ")]
    assert 1 <= len(steps) < 50


def _start_worker(data_dir: Path, worker_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "worker",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--data-dir",
            str(data_dir),
            "--lease-seconds",
            "1",
            "--worker-id",
            worker_id,
        ],
        cwd=REPO,
    )


@pytest.mark.slow
def test_killed_worker_job_is_retried_on_a_new_worker_and_sigterm_requeues(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    data_dir = make_data_dir(tmp_path / "data", tiny_model_dir)
    settings = Settings(data_dir=data_dir)
    api = open_queue(settings, role="api")
    first = _start_worker(data_dir, "doomed")
    second: subprocess.Popen[bytes] | None = None
    try:
        rid = api.submit(job(num_inference_steps=50)).id
        wait_until(lambda: (r := api.get(rid)) and r.progress > 0, 300, "the doomed worker to start")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        # the supervisor would call release_worker; here the lease (1 s) simply runs out
        wait_until(lambda: api.recover_expired() == [rid], 30, "the lease to expire")
        assert api.get(rid).status is Status.IN_QUEUE

        second = _start_worker(data_dir, "rescuer")
        record = wait_until(completed(api, rid), 300, "the retried job")
        assert record.succeeded and record.attempts == 2 and record.worker == "rescuer"
        messages = [e.message for e in record.logs]
        assert "Worker lost; retrying" in messages and "Started on rescuer" in messages

        # SIGTERM mid-job: the job goes back to the queue (no attempt counted), exit 0
        stopped = api.submit(job(num_inference_steps=50)).id
        wait_until(lambda: (r := api.get(stopped)) and r.progress > 0, 60, "the second job to start")
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
        requeued = api.get(stopped)
        assert requeued.status is Status.IN_QUEUE and requeued.attempts == 0
        assert {w.worker_id: w.state for w in api.workers()}["rescuer"] == "stopped"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        api.close()


def test_a_model_that_cannot_load_marks_the_worker_failed_with_exit_code_2(tmp_path: Path) -> None:
    settings = Settings(model=str(tmp_path / "no-such-model"), data_dir=tmp_path / "data", device="cpu")
    worker = Worker(settings, worker_id="broken")
    assert worker.run() == 2
    api = open_queue(settings, role="api")
    try:
        (info,) = api.workers()
        assert info.state == "failed" and "no-such-model" in info.detail
    finally:
        api.close()
