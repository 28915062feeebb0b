"""The worker's main loop: open the queue, load the model once, then claim -> generate -> hand
over to the finisher, until asked to stop or until a fault says a fresh process is needed.

The hand-over comes after the next claim: the finisher's encoding and database writes would
otherwise compete with that claim (for the GIL and SQLite's write lock) and leave the device
idle for milliseconds. Nothing else (no queue round trip, no sleep) runs between two jobs, and
nothing touches the queue while a job generates: its steps and the cancel flag go through
memory, the progress relay (server/worker/progress.py) carries them to and from the queue.
How long the device sat idle between two queued jobs is measured here and reported
(`device_idle_before` in a result's timings, the `fluxserver_device_idle_seconds` histogram).

How it ends (server/exit_codes.py): SIGTERM/SIGINT -> EXIT_OK (the running job stops at its
next step and goes back to the head of the queue without counting as an attempt; images
already generated are finished); the model cannot load -> EXIT_LOAD_FAILED; the GPU context
is lost -> EXIT_DEVICE_LOST; `max_consecutive_failures` internal failures in a row ->
EXIT_FAILING. The watchdog (EXIT_HUNG) and a dying helper thread (EXIT_HELPER_DIED) end the
process from their own threads. Each records the worker's state ("stopped" or "failed" with
the reason) before it exits, as far as the queue can be reached.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from models.lora.errors import LoraError
from models.request import InputError
from server import lifecycle, metrics
from server.config import Settings
from server.exit_codes import EXIT_DEVICE_LOST, EXIT_FAILING, EXIT_HUNG, EXIT_LOAD_FAILED, EXIT_OK, EXIT_USAGE
from server.jobs import JobRecord, cancelled_error
from server.queue.base import JobQueue, QueueUnavailable
from server.queue.factory import open_queue
from server.storage import StorageUnavailable, open_storage
from server.worker.faults import (
    DEVICE_LOST_REQUEUED,
    FailureStreak,
    GpuFault,
    GpuOutOfMemory,
    device_lost_before,
    gpu_fault,
    is_queue_outage,
)
from server.worker.finisher import Finished, Finisher
from server.worker.generation import generate
from server.worker.heartbeat import Heartbeat, Watchdog
from server.worker.held import HeldJob, HeldJobs, Stage
from server.worker.lora.jobs import JobLoras
from server.worker.outcomes import Outcomes
from server.worker.progress import ProgressRelay
from server.worker.request import (
    generation_request,
    input_error,
    internal_error,
    parse_sizes,
    unexpected_error,
)
from server.worker.retry import Backoff, QueueOutage, best_effort, until_back
from server.worker.state import StateRecorder
from server.worker.threads import hard_exit, start_helper
from server.worker.variants import WorkerVariants

if TYPE_CHECKING:
    from models.runtime import FluxRuntime

logger = logging.getLogger(__name__)

CLAIM_TIMEOUT_SECONDS = 1.0
# How long a worker that is ending waits for its last state to reach the queue.
FINAL_STATE_SECONDS = 5.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        worker_id: str | None = None,
        *,
        exit_process: Callable[[int], None] = hard_exit,
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        # Ends the process from a helper thread (tests pass one that records the status).
        self.exit_process = exit_process
        self.storage = open_storage(settings)
        self.loras = JobLoras(settings, self.storage)
        self.variants = WorkerVariants(settings, self.worker_id)  # which it serves, prefers, reports
        self.device = settings.device
        self.held = HeldJobs()
        self.streak = FailureStreak(settings.max_consecutive_failures)
        self.outage = QueueOutage(on_change=self._outage_changed)
        self.queue: JobQueue | None = None  # opened by `run`, waiting out an outage
        self.state: StateRecorder | None = None
        self.runtime: FluxRuntime | None = None  # set once loaded
        self.relay: ProgressRelay | None = None  # started with the main loop
        self._stop = threading.Event()
        self._ending: tuple[int, str] | None = None  # (exit status, reason) once a fault ends the loop
        # When the last job's generate ended: perf_counter (for the gap) and wall time (to tell
        # whether the next job was already waiting then).
        self._device_free_since: tuple[float, float] | None = None

    # --- control -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler or another thread)."""
        self._stop.set()
        if self.queue is not None:
            self.queue.interrupt_claim()

    def _outage_changed(self, reason: str | None) -> None:
        if self.state is not None:
            self.state.note(reason and f"{reason}; waiting for it")

    # --- start and end -------------------------------------------------------------------
    def run(self) -> int:
        try:
            queue = self._open_queue()
        except (ValueError, QueueUnavailable) as exc:  # a wrong URL or password: not an outage
            logger.error("%s", exc)
            return EXIT_USAGE
        if queue is None:
            return EXIT_OK  # stopped while waiting for the queue
        self.queue = queue
        try:
            self._release_predecessor(queue)
        except QueueUnavailable:
            return EXIT_OK  # stopped while waiting for the queue
        self.state = StateRecorder(queue, self.worker_id, self.settings.model, self.outage)
        start_helper("state", self.state.run, self.exit_process)
        try:
            runtime = self.runtime = self._load()
        except Exception as exc:
            logger.exception("worker %s could not load the model", self.worker_id)
            self._end("failed", f"could not load the model: {type(exc).__name__}: {exc}")
            return EXIT_LOAD_FAILED
        try:
            self._serve(runtime, queue)
        except BaseException as exc:
            self._end("failed", f"crashed: {type(exc).__name__}: {exc}")
            raise
        if self._ending is not None:
            code, reason = self._ending
            self._end("failed", reason)
            return code
        self._end("stopped")
        return EXIT_OK

    def _open_queue(self) -> JobQueue | None:
        """The queue, waiting with backoff while its database cannot be reached."""
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                queue = open_queue(self.settings, role="worker")
            except Exception as exc:
                if not is_queue_outage(exc):
                    raise
                self.outage.failed(exc, "opening the queue")
                self._stop.wait(backoff.next_delay())
                continue
            self.outage.succeeded()
            return queue
        return None

    def _release_predecessor(self, queue: JobQueue) -> None:
        """Jobs still leased to this worker id belong to a process of it that is gone (the
        supervisor runs one process per id): they go back to the queue now, before this one
        claims anything. The supervisor releases them too when it can; during a queue outage
        it leaves that to the successor, which could otherwise lose a job it claimed to that
        late release."""
        released = until_back(
            lambda: queue.release_worker(self.worker_id),
            doing="releasing the jobs of this worker's last process",
            outage=self.outage,
            stopping=self._stop,
        )
        if released:
            logger.warning(
                "jobs %s of this worker's last process went back to the queue", ", ".join(released)
            )

    def _end(self, state: str, detail: str = "") -> None:
        assert self.state is not None and self.queue is not None
        if state == "failed":
            logger.error("worker %s: %s", self.worker_id, detail)
        self.state.set(state, detail)
        self.state.wait_written(FINAL_STATE_SECONDS)
        self.state.close()
        self.queue.close()

    def _load(self) -> FluxRuntime:
        from models.loading import load_runtime, resolve_device
        from models.presets.policy import default_warmup_sizes

        assert self.state is not None
        self.state.set("loading", device=self.device)  # the asked-for device ("auto"), then the real one
        self.device = resolve_device(self.settings.device)
        self.state.set("loading", device=self.device)
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
            variants=self.variants.options(),
            tuning=self.settings.preset_tuning,
        )
        logger.info("model loaded in %.1f s: %s", time.perf_counter() - started, runtime.summary)
        sizes = parse_sizes(self.settings.warmup_sizes) or default_warmup_sizes(self.device)
        if sizes:
            logger.info("warming up %d size(s) (compiling; this can take minutes on a GPU)", len(sizes))
            self.state.set("warming", ", ".join(f"{w}x{h}" for w, h in sizes))
            seconds = runtime.warmup(sizes)
            logger.info("warmed up %d size(s) in %.1f s", len(sizes), seconds)
            metrics.record_compiles("warmup", runtime.warmup_compiled.graphs, runtime.warmup_compiled.seconds)
        return runtime

    # --- main loop -----------------------------------------------------------------------
    def _serve(self, runtime: FluxRuntime, queue: JobQueue) -> None:
        assert self.state is not None
        self.outcomes = Outcomes(queue, self.worker_id, self.held, self.outage, self.streak, self._stop)
        relay = self.relay = ProgressRelay(queue, self.held, self.outage)
        finisher = Finisher(
            queue,
            self.storage,
            self.worker_id,
            self.outcomes,
            self.outage,
            self._report_gpu_memory,
            self._stop,
            flush_progress=lambda job: relay.flush(job, final=True),
            retention_seconds=self.settings.retention_seconds,
            storage_retry_seconds=self.settings.storage_retry_seconds,
        )
        heartbeat = Heartbeat(queue, self.worker_id, self.held, self.outage, self.settings.lease_seconds)
        finisher_thread = start_helper("finisher", finisher.run, self.exit_process)
        start_helper("heartbeat", heartbeat.run, self.exit_process)
        start_helper("progress", relay.run, self.exit_process)
        watchdog = None
        if self.settings.watchdog_seconds > 0:
            watchdog = Watchdog(self.held, self.settings.watchdog_seconds, self._hung)
            start_helper("watchdog", watchdog.run, self.exit_process)
        self.state.set("ready", runtime.summary)
        self._report_gpu_memory()
        self.variants.record(runtime)
        logger.info("worker %s ready on %s", self.worker_id, self.device)
        claim_backoff = Backoff()
        finished: Finished | None = None
        try:
            while not self._stop.is_set() and self._ending is None:
                if self.streak.tripped.is_set():
                    self._ending = (
                        EXIT_FAILING,
                        f"{self.streak.count} jobs failed in a row; stopped taking jobs. "
                        f"Last error: {self.streak.last_error}",
                    )
                    break
                # Jobs whose variant is on its GPU, or whose LoRAs it holds; only jobs it serves.
                prefer = self.variants.preference(runtime, self.loras.preference(runtime.loras.loaded))
                # With a finished job in hand, only look for the next one (no wait), then hand
                # the finished one over and start the next at once.
                timeout = 0.0 if finished is not None else CLAIM_TIMEOUT_SECONDS
                try:
                    record = queue.claim(self.worker_id, timeout=timeout, prefer=prefer)
                except Exception as exc:
                    if not is_queue_outage(exc):
                        raise
                    self.outage.failed(exc, "claiming a job")
                    record = None
                    if finished is None:
                        self._stop.wait(claim_backoff.next_delay())
                else:
                    claim_backoff.reset()
                    if record is not None:
                        self.outage.succeeded()
                if finished is not None:
                    finisher.put(finished)
                    finished = None
                if record is not None:
                    finished = self._run_job(runtime, queue, record)
        finally:
            if finished is not None:
                finisher.put(finished)
            finisher.close()
            finisher_thread.join()
            heartbeat.stop.set()  # only now: the finisher's jobs needed their leases
            relay.stop.set()
            relay.wake()
            if watchdog is not None:
                watchdog.stop.set()

    def _run_job(self, runtime: FluxRuntime, queue: JobQueue, record: JobRecord) -> Finished | None:
        """Generate `record`'s images; what the finisher must store, or None (ended here)."""
        job = self.held.hold(record)
        lifecycle.started(record, self.worker_id)
        started = time.perf_counter()
        idle_before: float | None = None
        try:
            # Downloads run here, inside the lease; an outage of the store is waited out.
            specs = self.loras.specs_retrying(record.job, self._stop, self._note(queue, job))
            if specs is None:
                self.outcomes.requeue(job, "Worker stopping; requeued")
                return None
            loras = tuple(specs)
            job.enter(Stage.ENCODING)
            request = generation_request(record.job, loras)
            idle_before = self._device_idle(record)
            try:
                generation = generate(
                    runtime,
                    request,
                    on_step=self._on_step(job),
                    should_cancel=self._should_cancel(job),
                    device=self.device,
                )
            finally:
                self._device_free_since = (time.perf_counter(), time.time())
        except LoraError as exc:  # names the LoRA; fal's 422 shape, located at its path
            logger.info("job %s refused: %s", job.id, exc)
            self.outcomes.fail(job, self.loras.error(record.job, exc), internal=False)
            return None
        except StorageUnavailable as exc:  # a LoRA upload unreadable for longer than the retries
            logger.error("job %s failed: %s", job.id, exc)
            error = internal_error(f"a LoRA could not be read from this server's store: {exc.strerror}", 503)
            self.outcomes.fail(job, error, internal=True)
            return None
        except InputError as exc:  # the request's own fault (TaskUnavailable included): a 4xx
            logger.info("job %s refused: %s", job.id, exc)
            self.outcomes.fail(job, input_error(str(exc)), internal=False)
            return None
        except GpuOutOfMemory as exc:
            logger.error("job %s failed: %s", job.id, exc)
            self.outcomes.fail(job, internal_error(str(exc)), internal=True)
            self._report_gpu_memory()
            return None
        except Exception as exc:  # any other failure is ours, a ValueError from diffusers too
            if gpu_fault(exc) is GpuFault.DEVICE_LOST:
                self._device_lost(job, exc)
                return None
            logger.exception("job %s failed", job.id)
            detail = f"{type(exc).__name__}: {exc}"
            self.outcomes.fail(job, unexpected_error(job.id), internal=True, detail=detail)
            self._report_gpu_memory()
            return None

        if generation.swap is not None:  # /metrics and /health show what its GPU holds now
            self.variants.record(runtime, generation)
            if self.state is not None:
                self.state.set("ready", runtime.summary)
        if generation.cancelled or job.lease_lost:
            if job.lease_lost:
                self.outcomes.abandon(job, "lease lost")
            elif job.cancel_requested or until_back(
                lambda: queue.is_cancel_requested(job.id), doing="reading a cancel flag", outage=self.outage
            ):
                self.outcomes.fail(job, cancelled_error(), internal=False)
            else:  # stopping
                self.outcomes.requeue(job, "Worker stopping; requeued")
            return None
        metrics.record_compiles("request", generation.compiled.graphs, generation.compiled.seconds)
        if record.job.loras:
            metrics.lora_cache_lookups_total.labels("hit").inc(generation.lora_hits)
            metrics.lora_cache_lookups_total.labels("miss").inc(generation.lora_misses)
        # Still held: the heartbeat keeps renewing the lease until the finisher completes it.
        return Finished(job, generation, time.perf_counter() - started, idle_before)

    def _device_idle(self, record: JobRecord) -> float | None:
        """Seconds since the previous job left the device, up to this job's generate call.
        Between two queued jobs this is only what the loop itself costs (claiming, mapping,
        resolving LoRAs); docs/benchmarks.md reports it. Recorded in the histogram only for
        a job that was already waiting when the device became free: a gap spent waiting for
        requests says nothing about the worker."""
        if self._device_free_since is None:
            return None
        free_since, free_at = self._device_free_since
        idle = time.perf_counter() - free_since
        if record.created_at <= free_at:
            metrics.device_idle_seconds.observe(idle)
        return idle

    def _note(self, queue: JobQueue, job: HeldJob) -> Callable[[str], None]:
        """A line for the request's log, written when the queue answers (never waited on)."""

        def note(line: str) -> None:
            best_effort(lambda: queue.log(job.id, line), None, doing="logging", outage=self.outage)

        return note

    def _on_step(self, job: HeldJob) -> Callable[[int, int], None]:
        """Runs on the denoising thread after every step: memory only, never the queue."""

        relay = self.relay

        def on_step(step: int, total: int) -> None:
            job.stepped(step, total)  # for the watchdog and the progress relay
            if relay is not None and step in (1, total):
                # Progress shows at once, and "step N/N" while the images are decoded.
                relay.wake()

        return on_step

    def _should_cancel(self, job: HeldJob) -> Callable[[], bool]:
        """Runs on the denoising thread at every step: flags in memory only (the progress
        relay refreshes `cancel_requested` from the queue)."""

        def should_cancel() -> bool:
            return self._stop.is_set() or job.lease_lost or job.hung or job.cancel_requested

        return should_cancel

    # --- faults --------------------------------------------------------------------------
    def _device_lost(self, job: HeldJob, exc: Exception) -> None:
        """A sticky GPU error: give the job back (unless it did this before) and end the loop
        so that a fresh process gets a fresh CUDA context."""
        reason = f"{type(exc).__name__}: {exc}"
        logger.critical("job %s: the GPU failed (%s); this worker ends", job.id, reason, exc_info=exc)
        # The CUDA error's text stays in this log; the job's log lines and error (which clients
        # read) say only what happened.
        if device_lost_before(job.record):  # a poison job: it would take down every worker
            message = f"the GPU failed twice running request {job.id}; giving up (details in the server log)"
            self.outcomes.fail(job, internal_error(message), internal=True)
        else:
            self.outcomes.requeue(job, DEVICE_LOST_REQUEUED)
        self._ending = (EXIT_DEVICE_LOST, f"the GPU failed: {reason}; a fresh process is needed")

    def _hung(self, job: HeldJob, stalled: float) -> None:
        """The watchdog's verdict (its thread): no progress on a held job for too long."""
        detail = (
            f"no progress on {job.describe()} for {stalled:.0f} s "
            f"(watchdog_seconds {self.settings.watchdog_seconds:g}); exiting so that it is retried"
        )
        logger.critical("worker %s: %s", self.worker_id, detail)
        if self.state is not None:
            self.state.set("failed", detail)
            self.state.wait_written(FINAL_STATE_SECONDS)
        self.exit_process(EXIT_HUNG)

    def _report_gpu_memory(self) -> None:
        """Memory of this worker's GPU, for /metrics (nothing to report on a CPU). Called from
        the main loop and the finisher thread, so the device is named, never "current"; a
        figure that cannot be read is logged and skipped: a metric never ends a worker."""
        if not str(self.device).startswith("cuda"):
            return
        try:
            import torch

            index = torch.device(self.device).index
            if index is None:
                index = torch.cuda.current_device()
            used = torch.cuda.memory_allocated(index)
            total = torch.cuda.get_device_properties(index).total_memory
            metrics.record_gpu_memory(self.worker_id, used, total)
        except Exception as exc:
            logger.warning("could not read the GPU's memory for /metrics: %s: %s", type(exc).__name__, exc)
