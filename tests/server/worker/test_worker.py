"""The worker loop against the real tiny runtime: in a thread, and as `flux-server worker`
processes that are killed (SIGKILL) and stopped (SIGTERM) mid-job."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from models.request import GenerationRequest
from server.config import Settings
from server.exit_codes import EXIT_LOAD_FAILED
from server.jobs import MAX_SEED, Status
from server.queue.base import CancelOutcome, JobQueue
from server.queue.factory import open_queue
from server.storage import LocalStorage
from server.worker import Worker, generation_request
from tests.server.worker.support import REPO, ThreadWorker, completed, job, make_data_dir
from tests.support import wait_until


@dataclass
class Served:
    api: JobQueue
    settings: Settings
    worker: Worker


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    """One in-thread worker on the tiny model, shared by the tests of this module."""
    data_dir = make_data_dir(tmp_path_factory.mktemp("worker") / "data", tiny_model_dir)
    settings = Settings(model="tiny", data_dir=data_dir, device="cpu", lease_seconds=30.0)
    api = open_queue(settings, role="api")
    running = ThreadWorker(settings, "thread-worker").start(api)
    yield Served(api, settings, running.worker)
    assert running.stop() == 0 and running.exits == []
    assert [w.state for w in api.workers()] == ["stopped"]
    api.close()


def test_a_job_completes_with_a_stored_image_and_step_logs(served: Served) -> None:
    api, settings = served.api, served.settings
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


def test_inline_images_are_data_uris_and_nothing_is_stored(served: Served) -> None:
    api, settings = served.api, served.settings
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
    served: Served,
) -> None:
    api = served.api
    bad = api.submit(job(width=65)).id  # not a multiple of 16: the runtime refuses it
    good = api.submit(job()).id
    record = wait_until(completed(api, bad), what="the bad job")
    assert record.error.status_code == 422
    assert record.error.body["detail"][0]["loc"] == ["body"] and "65" in record.error.body["detail"][0]["msg"]
    assert wait_until(completed(api, good), what="the next job").succeeded


def test_an_undecodable_input_image_is_the_clients_422(served: Served) -> None:
    api = served.api
    rid = api.submit(job(task="image-to-image", image=b"not an image")).id
    record = wait_until(completed(api, rid), what="the job")
    assert record.error.status_code == 422 and record.error.error_type == "validation_error"
    assert "input image cannot be decoded" in record.error.message


def test_a_value_error_from_inside_diffusers_is_a_server_error_with_a_traceback(
    served: Served, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # A step-cache preset on a transformer that already carries a cache: diffusers raises
    # ValueError while generating. The client sent nothing wrong: a 500, logged with its traceback.
    from diffusers import FirstBlockCacheConfig

    from models.presets.apply import PresetManager
    from models.presets.policy import PRESETS, CacheSetting, Preset

    api, runtime = served.api, served.worker.runtime
    assert runtime is not None
    original = runtime.presets
    runtime.presets = PresetManager(
        runtime.pipe.transformer,
        device="cpu",
        enabled=["none", "high"],
        data_dir=tmp_path,
        presets={"none": PRESETS["none"], "high": Preset("high", cache=CacheSetting("first_block", 0.5))},
        compile_backend="eager",
    )
    runtime.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        with caplog.at_level("ERROR", logger="server.worker"):
            rid = api.submit(job(acceleration="high")).id
            record = wait_until(completed(api, rid), what="the failing job")
    finally:
        runtime.pipe.transformer.disable_cache()
        runtime.presets = original
    assert record.error.status_code == 500 and record.error.error_type == "internal_server_error"
    # The client reads a generic message naming the request; the exception is in the log only.
    assert record.error.message.startswith(f"Internal error while running request {rid};")
    assert "ValueError" not in record.error.message and "cache" not in record.error.message
    (logged,) = [r for r in caplog.records if r.getMessage() == f"job {rid} failed"]
    assert logged.exc_info is not None and logged.exc_info[0] is ValueError
    assert any("diffusers" in frame.filename for frame in _frames(logged.exc_info[2]))
    assert wait_until(completed(api, api.submit(job()).id), what="the next job").succeeded


def _frames(tb: object) -> list:
    import traceback

    return traceback.extract_tb(tb)  # type: ignore[arg-type]


def test_queued_jobs_report_how_long_the_device_sat_idle_before_them(served: Served) -> None:
    api = served.api
    first, second = api.submit(job(seed=1, num_inference_steps=20)).id, api.submit(job(seed=2)).id
    done = [wait_until(completed(api, rid), what="the queued jobs") for rid in (first, second)]
    gaps = [record.result.timings["device_idle_before"] for record in done]
    # The second waited in the queue while the first ran: only the loop's own cost separates
    # them, far less than the first job's whole inference (the first followed an idle queue).
    assert 0 <= gaps[1] < done[0].result.timings["inference"]


def test_the_ready_worker_says_what_it_loaded(served: Served) -> None:
    (info,) = served.api.workers()
    assert info.state == "ready"
    assert info.detail == (
        "tiny; memory plan resident; no safety checker; "
        "variants [device: dev, fill, kontext, krea, tiny-finetune]"  # --model tiny serves every one
    )


def test_a_job_without_a_seed_gets_one_drawn_by_the_server() -> None:
    first = generation_request(job(seed=None))  # Job draws it; the request carries it
    assert isinstance(first, GenerationRequest) and 0 <= first.seed < MAX_SEED
    assert generation_request(job(seed=None)).seed != first.seed  # drawn afresh, not a constant
    assert generation_request(job(seed=2**64 - 1)).seed == 2**64 - 1  # a client's seed is kept


def test_the_request_carries_every_field_the_runtime_reads() -> None:
    source = job(
        task="image-to-image",
        image=b"png",
        strength=0.5,
        guidance_scale=2.0,
        num_images=2,
        acceleration="regular",
        enable_safety_checker=False,
        safety_tolerance=4,
        seed=9,
    )
    request = generation_request(source)
    assert (request.task, request.image, request.strength, request.guidance) == (
        "image-to-image",
        b"png",
        0.5,
        2.0,
    )
    assert (request.steps, request.num_images, request.acceleration) == (3, 2, "regular")
    assert (request.enable_safety_checker, request.safety_tolerance, request.seed) == (False, 4, 9)
    assert (request.width, request.height, request.prompt) == (64, 64, "a red fox")


def test_the_request_carries_the_variant_and_its_fields() -> None:
    source = job(
        task="edit-inpainting",
        variant="kontext",
        image=b"png",
        mask=b"mask",
        reference_image=b"ref",
        resolution_mode="16:9",
        paste_back=False,
        resize_to_original=True,
    )
    request = generation_request(source)
    assert (request.task, request.variant, request.reference_image, request.mask) == (
        "edit-inpainting",
        "kontext",
        b"ref",
        b"mask",
    )
    assert (request.resolution_mode, request.paste_back, request.resize_to_original) == ("16:9", False, True)


def test_cancel_stops_a_running_job_at_its_next_step(served: Served) -> None:
    api = served.api
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
            "server.supervisor.cli",
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


def test_a_model_that_cannot_load_marks_the_worker_failed_with_exit_load_failed(tmp_path: Path) -> None:
    settings = Settings(model=str(tmp_path / "no-such-model"), data_dir=tmp_path / "data", device="cpu")
    worker = Worker(settings, worker_id="broken")
    assert worker.run() == EXIT_LOAD_FAILED == 3
    api = open_queue(settings, role="api")
    try:
        (info,) = api.workers()
        assert info.state == "failed" and "no-such-model" in info.detail
    finally:
        api.close()
