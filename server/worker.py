"""The worker process: load the model once, then claim -> generate -> store -> complete.

Three threads:
- the main loop claims a job (blocking on the queue's wake-up socket), runs it on the
  runtime, and hands the finished images to the finisher so the device never waits on Python
  (encoding, writing files, the database) between two jobs. The hand-over comes after the
  next claim: the finisher's encoding and database writes would otherwise compete with that
  claim (for the GIL and SQLite's write lock) and leave the device idle for milliseconds;
- the finisher encodes and stores the images and completes the job;
- the heartbeat renews the lease of every job this worker holds, every lease/3 seconds; a lease
  it cannot renew belongs to someone else now, so that job is abandoned at its next step.

SIGTERM (or SIGINT) stops the worker cleanly: the running job stops at its next step and goes
back to the head of the queue without counting as an attempt, the images already generated are
finished, the worker's state becomes "stopped", and the process exits 0.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.lora.errors import LoraError
from models.lora.spec import LoraSpec
from models.request import GenerationRequest, InputError
from server import lifecycle, metrics
from server.config import Settings
from server.images import content_type, encode_image, to_data_uri
from server.jobs import Job, JobError, JobRecord, JobResult, OutputImage, cancelled_error, parse_wxh
from server.lora.jobs import JobLoras
from server.queue.factory import open_queue
from server.storage import LocalStorage

if TYPE_CHECKING:
    from models.runtime import FluxRuntime, Generation

logger = logging.getLogger(__name__)

# Exit code for a model that cannot load: the supervisor must not restart it in a tight loop.
EXIT_LOAD_FAILED = 2
CLAIM_TIMEOUT_SECONDS = 1.0


def generation_request(job: Job, loras: tuple[LoraSpec, ...] = ()) -> GenerationRequest:
    """The runtime's request for `job`: what to generate, none of the routing metadata.
    `Job.seed` is always concrete (server.jobs draws one when a client sent none). `loras`:
    the job's LoRAs, already resolved to local files (server.lora)."""
    return GenerationRequest(
        prompt=job.prompt,
        width=job.width,
        height=job.height,
        seed=job.seed,
        task=job.task,
        steps=job.num_inference_steps,
        guidance=job.guidance_scale,
        num_images=job.num_images,
        strength=job.strength,
        image=job.image,
        mask=job.mask,
        loras=loras,
        acceleration=job.acceleration,
        enable_safety_checker=job.enable_safety_checker,
        safety_tolerance=job.safety_tolerance,
    )


def input_error(message: str) -> JobError:
    """The client's fault (bad size, undecodable image, task not loaded): a fal-style 422."""
    return JobError(
        message=message,
        error_type="validation_error",
        status_code=422,
        body={"detail": [{"loc": ["body"], "msg": message, "type": "value_error"}]},
    )


def internal_error(message: str) -> JobError:
    return JobError(message=message, error_type="internal_server_error", status_code=500)


def parse_sizes(items: list[str]) -> list[tuple[int, int]]:
    return [parse_wxh(item) for item in items]


@dataclass
class _Finished:
    record: JobRecord
    generation: Generation
    seconds: float
    idle_before: float | None


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.queue = open_queue(settings, role="worker")
        self.storage = LocalStorage(settings.files_dir)
        self.loras = JobLoras(settings, self.storage)
        self.device = settings.device
        self._stop = threading.Event()
        self._held: dict[str, threading.Event] = {}  # request id -> set when its lease is lost
        self._held_lock = threading.Lock()
        self._finished: queue.Queue[_Finished | None] = queue.Queue()
        self._heartbeat_stop = threading.Event()
        self._device_free_since: float | None = None  # perf_counter when the last job's generate ended
        self.runtime: FluxRuntime | None = None  # set once loaded

    # --- control -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler or another thread)."""
        self._stop.set()
        self.queue.interrupt_claim()

    def _state(self, state: str, detail: str = "") -> None:
        self.queue.set_worker_state(
            self.worker_id, state, device=self.device, model=self.settings.model, detail=detail
        )

    # --- main loop -----------------------------------------------------------------------
    def run(self) -> int:
        try:
            runtime = self.runtime = self._load()
        except Exception as exc:
            logger.exception("worker %s could not load the model", self.worker_id)
            self._state("failed", f"{type(exc).__name__}: {exc}")
            self.queue.close()
            return EXIT_LOAD_FAILED

        threads = [
            threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True),
            threading.Thread(target=self._finisher, name="finisher", daemon=True),
        ]
        for thread in threads:
            thread.start()
        self._state("ready", runtime.summary)
        self._report_gpu_memory()
        logger.info("worker %s ready on %s", self.worker_id, self.device)
        finished: _Finished | None = None
        try:
            while not self._stop.is_set():
                prefer = self.loras.preference(runtime.loras.loaded)  # jobs whose LoRAs it holds
                # With a finished job in hand, only look for the next one (no wait), then hand
                # the finished one over and start the next at once.
                timeout = 0.0 if finished is not None else CLAIM_TIMEOUT_SECONDS
                record = self.queue.claim(self.worker_id, timeout=timeout, prefer=prefer)
                if finished is not None:
                    self._finished.put(finished)
                    finished = None
                if record is not None:
                    finished = self._run_job(runtime, record)
        finally:
            if finished is not None:
                self._finished.put(finished)
            self._finished.put(None)
            threads[1].join()
            self._heartbeat_stop.set()  # only now: the finisher's jobs needed their leases
            threads[0].join()
            self._state("stopped")
            self.queue.close()
        return 0

    def _load(self) -> FluxRuntime:
        from models.loading import load_runtime, resolve_device
        from models.presets.policy import default_warmup_sizes

        self._state("loading")  # first with the asked-for device ("auto"), then the real one
        self.device = resolve_device(self.settings.device)
        self._state("loading")
        logger.info("loading model %s on %s", self.settings.model, self.device)
        started = time.perf_counter()
        runtime = load_runtime(
            self.settings.model,
            data_dir=self.settings.data_dir,
            components_dir=self.settings.components_dir,
            safety_checker=self.settings.safety_checker,
            device=self.device,
            presets=self.settings.presets,
            memory_plan=self.settings.memory_plan,
            lora_limits=self.loras.limits(),
        )
        logger.info("model loaded in %.1f s: %s", time.perf_counter() - started, runtime.summary)
        sizes = parse_sizes(self.settings.warmup_sizes) or default_warmup_sizes(self.device)
        if sizes:
            logger.info("warming up %d size(s) (compiling; this can take minutes on a GPU)", len(sizes))
            self._state("warming", ", ".join(f"{w}x{h}" for w, h in sizes))
            seconds = runtime.warmup(sizes)
            logger.info("warmed up %d size(s) in %.1f s", len(sizes), seconds)
        return runtime

    def _run_job(self, runtime: FluxRuntime, record: JobRecord) -> _Finished | None:
        """Generate `record`'s images; what the finisher must store, or None (failed, cancelled)."""
        request_id = record.id
        lease_lost = threading.Event()
        with self._held_lock:
            self._held[request_id] = lease_lost

        def on_step(step: int, total: int) -> None:
            self.queue.log(request_id, f"step {step}/{total}", progress=step / total)

        def should_cancel() -> bool:
            return self._stop.is_set() or lease_lost.is_set() or self.queue.is_cancel_requested(request_id)

        lifecycle.started(record, self.worker_id)
        started = time.perf_counter()
        # How long the device sat idle since the previous job: between two queued jobs, only
        # what the loop itself costs (claiming, mapping); docs/benchmarks.md reports it.
        idle_before = None if self._device_free_since is None else started - self._device_free_since
        try:
            loras = tuple(self.loras.specs(record.job))  # downloads run here, inside the lease
            request = generation_request(record.job, loras)
            try:
                generation = runtime.generate(request, on_step=on_step, should_cancel=should_cancel)
            finally:
                self._device_free_since = time.perf_counter()
        except LoraError as exc:  # names the LoRA; fal's 422 shape, located at its path
            logger.info("job %s refused: %s", request_id, exc)
            self._fail(record, self.loras.error(record.job, exc))
            return None
        except InputError as exc:  # the request's own fault (TaskUnavailable included): a 4xx
            logger.info("job %s refused: %s", request_id, exc)
            self._fail(record, input_error(str(exc)))
            return None
        except Exception as exc:  # any other failure is ours, a ValueError from diffusers too
            logger.exception("job %s failed", request_id)
            self._fail(record, internal_error(f"{type(exc).__name__}: {exc}"))
            return None

        if generation.cancelled or lease_lost.is_set():
            self._release(request_id)
            if lease_lost.is_set():
                logger.warning("job %s: lease lost; abandoned", request_id)
            elif self.queue.is_cancel_requested(request_id):
                self._fail(record, cancelled_error())
            else:  # stopping
                self.queue.requeue(request_id, self.worker_id)
            return None
        for line in generation.log:
            self.queue.log(request_id, line)
        if record.job.loras:
            metrics.lora_cache_lookups_total.labels("hit").inc(generation.lora_hits)
            metrics.lora_cache_lookups_total.labels("miss").inc(generation.lora_misses)
        # Still held: the heartbeat keeps renewing the lease until the finisher completes it.
        return _Finished(record, generation, time.perf_counter() - started, idle_before)

    def _release(self, request_id: str) -> None:
        with self._held_lock:
            self._held.pop(request_id, None)

    def _fail(self, record: JobRecord, error: JobError) -> None:
        self._release(record.id)
        if self.queue.fail(record.id, self.worker_id, error):
            lifecycle.finished(record, error)
        self._report_gpu_memory()

    def _report_gpu_memory(self) -> None:
        """Memory of this worker's GPU, for /metrics (nothing to report on a CPU)."""
        if not str(self.device).startswith("cuda"):
            return
        import torch

        used = torch.cuda.memory_allocated()
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        metrics.record_gpu_memory(self.worker_id, used, total)

    # --- finisher --------------------------------------------------------------------------
    def _finisher(self) -> None:
        while (item := self._finished.get()) is not None:
            try:
                self._finish(item)
            except Exception as exc:
                logger.exception("job %s: storing the output failed", item.record.id)
                self._fail(item.record, internal_error(f"{type(exc).__name__}: {exc}"))
            finally:
                self._release(item.record.id)

    def _finish(self, item: _Finished) -> None:
        job, generation, request_id = item.record.job, item.generation, item.record.id
        started = time.perf_counter()
        images: list[OutputImage] = []
        kind = content_type(job.output_format)
        for image in generation.images:
            data = encode_image(image, job.output_format)
            inline = job.inline_images
            images.append(
                OutputImage(
                    width=image.width,
                    height=image.height,
                    content_type=kind,
                    file_size=len(data),
                    data_uri=to_data_uri(data, kind) if inline else None,
                    file_name=None if inline else self.storage.save(data, job.output_format),
                )
            )
        timings = {"inference": item.seconds, **generation.timings}
        if item.idle_before is not None:
            timings["device_idle_before"] = item.idle_before
        timings["store"] = time.perf_counter() - started
        result = JobResult(
            images=images,
            seed=generation.seed,
            prompt=job.prompt,
            has_nsfw_concepts=generation.has_nsfw_concepts,
            nsfw_checked=generation.nsfw_checked,
            timings=timings,
            preset=generation.preset,
            preset_note=generation.preset_note,
        )
        preset = generation.preset + (f": {generation.preset_note}" if generation.preset_note else "")
        seconds = item.seconds
        self.queue.log(request_id, f"Generated {len(images)} image(s) in {seconds:.2f} s (preset {preset})")
        if not self.queue.complete(request_id, self.worker_id, result):
            logger.warning("job %s: lease lost before completion; output discarded", request_id)
            for output in images:
                if output.file_name:
                    self.storage.delete(output.file_name)
            return
        lifecycle.finished(item.record, None, inference=item.seconds, images=len(images))
        self._report_gpu_memory()

    # --- heartbeat -------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        interval = max(self.settings.lease_seconds / 3, 0.05)
        while not self._heartbeat_stop.wait(interval):
            with self._held_lock:
                held = list(self._held.items())
            for request_id, lease_lost in held:
                if not self.queue.renew(request_id, self.worker_id):
                    lease_lost.set()


def run_worker(settings: Settings, worker_id: str | None = None, gpu: int | None = None) -> int:
    """`flux-server worker`: serve jobs until SIGTERM; exit 0, or 2 if the model cannot load."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before anything imports torch
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = Worker(settings, worker_id=worker_id)

    def on_signal(_signum: int, _frame: object) -> None:
        worker.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    return worker.run()
