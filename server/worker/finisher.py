"""The finisher thread: encode and store a job's images, then complete the job.

It runs beside the main loop so the device never waits on encoding, files or the database
between two jobs: the job's last log lines (the steps not yet written, the runtime's own
lines such as LoRA loads, "Generated ...") are written here too. Completion and files:
- `complete` returned True: done.
- `complete` returned False: the job surely is not ours any more (its lease was lost and it
  was retried or failed elsewhere): the files just written are deleted.
- `complete` raised because the queue is unreachable: the outcome is unknown (a COMMIT may
  have landed while its acknowledgement was lost), so it is retried until the queue answers,
  and a False after such a retry is checked against the record before any file is deleted.
  An unexpected exception keeps the files (a purge or sweep removes what nothing references).
A storage error (`OSError`: a full disk, a read-only mount, a bucket refusing the
credentials) fails the job with a message that says why and removes the files it had written;
the worker keeps serving. A store that is unavailable for now (`StorageUnavailable`: a bucket's
endpoint down, timing out or answering 5xx) is retried with backoff, the job held and its
lease renewed, for up to `--storage-retry-seconds`; then the job fails the same way. A worker
asked to stop meanwhile leaves the job to its lease: it runs again elsewhere. Either way the
request is never lost: it ends failed with the reason, or runs again.
"""

from __future__ import annotations

import contextlib
import logging
import queue as queue_module
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from server import lifecycle
from server.images import content_type, encode_image, to_data_uri
from server.jobs import JobResult, OutputImage
from server.queue.base import JobQueue
from server.storage import Storage, StorageUnavailable
from server.worker.faults import is_queue_outage, storage_error
from server.worker.held import HeldJob, Stage
from server.worker.outcomes import Outcomes
from server.worker.request import unexpected_error
from server.worker.retry import STOPPING_PATIENCE_SECONDS, Backoff, QueueOutage, best_effort, until_back

if TYPE_CHECKING:
    from models.runtime import Generation

logger = logging.getLogger(__name__)


@dataclass
class Finished:
    """A job whose images are generated, still held (its lease renewed) until completed."""

    job: HeldJob
    generation: Generation
    seconds: float
    idle_before: float | None


class Finisher:
    def __init__(
        self,
        queue: JobQueue,
        storage: Storage,
        worker_id: str,
        outcomes: Outcomes,
        outage: QueueOutage,
        after_job: Callable[[], None],
        stopping: threading.Event,
        *,
        flush_progress: Callable[[HeldJob], None] = lambda job: None,
        retention_seconds: float = 24 * 3600.0,
        storage_retry_seconds: float = 0.0,
    ) -> None:
        self.queue, self.storage, self.worker_id = queue, storage, worker_id
        self.outcomes, self.outage, self.after_job = outcomes, outage, after_job
        self.stopping = stopping
        # The progress relay's step lines not written yet: written before the job's last lines.
        self.flush_progress = flush_progress
        # How long an image URL from the store must stay valid, and a store outage is waited out.
        self.retention_seconds = retention_seconds
        self.storage_retry_seconds = storage_retry_seconds
        self._items: queue_module.Queue[Finished | None] = queue_module.Queue()

    def put(self, item: Finished) -> None:
        item.job.enter(Stage.HANDED_OVER)
        self._items.put(item)

    def close(self) -> None:
        """Finish what was handed over, then end the thread."""
        self._items.put(None)

    def run(self) -> None:
        while (item := self._items.get()) is not None:
            self.finish(item)

    def finish(self, item: Finished) -> None:
        job = item.job
        job.enter(Stage.STORING)
        started = time.perf_counter()
        try:
            images = self._store_retrying(item)
        except OSError as exc:
            logger.exception("job %s: storing the output failed", job.id)
            self.outcomes.fail(job, storage_error(exc), internal=True)
            return
        except Exception as exc:  # encoding failed: ours, not the client's
            logger.exception("job %s: encoding the output failed", job.id)
            detail = f"{type(exc).__name__}: {exc}"
            self.outcomes.fail(job, unexpected_error(job.id), internal=True, detail=detail)
            return
        if images is None:
            self.outcomes.abandon(job, "stopping while the store was unavailable; its lease will run out")
            return
        result = self._result(item, images, time.perf_counter() - started)
        generation = item.generation
        preset = generation.preset + (f": {generation.preset_note}" if generation.preset_note else "")
        generated = f"Generated {len(images)} image(s) in {item.seconds:.2f} s (preset {preset})"
        self.flush_progress(job)  # the step lines first, and none after these
        for line in [*generation.log, generated]:
            best_effort(
                lambda line=line: self.queue.log(job.id, line),
                None,
                doing="logging",
                outage=self.outage,
                try_when_down=True,
            )
        job.enter(Stage.COMPLETING)
        try:
            done = self._complete(job, result)
        except Exception:
            logger.exception("job %s: completing it failed; its files are kept", job.id)
            self.outcomes.abandon(job, "completion failed")
            return
        if not done:  # its files go before the job is let go (a let-go job is gone)
            try:
                self._delete(images)
            finally:
                self.outcomes.abandon(job, "lease lost before completion; output discarded")
            return
        self.outcomes.completed(job)
        lifecycle.finished(job.record, None, inference=item.seconds, images=len(images))
        self.after_job()

    def _store_retrying(self, item: Finished) -> list[OutputImage] | None:
        """`_store`, tried again with backoff while the store is unavailable, for up to
        `storage_retry_seconds` (then the last error is raised). None: the worker is stopping."""
        job = item.job
        give_up_at = time.monotonic() + self.storage_retry_seconds
        backoff = Backoff()
        while True:
            try:
                return self._store(item)
            except StorageUnavailable as exc:
                left = give_up_at - time.monotonic()
                if left <= 0:
                    raise
                logger.warning("job %s: %s; retrying for up to %.0f s", job.id, exc, left)
                note = f"Storing the output failed ({exc.strerror}); retrying for up to {left:.0f} s"
                best_effort(
                    lambda note=note: self.queue.log(job.id, note), None, doing="logging", outage=self.outage
                )
                if self.stopping.wait(min(backoff.next_delay(), left)):
                    return None

    def _store(self, item: Finished) -> list[OutputImage]:
        job = item.job.record.job
        kind = content_type(job.output_format)
        lifetime = min(job.output_url_seconds or self.retention_seconds, self.retention_seconds)
        # Signed file URLs (auth on, local files) expire then too; None: with the result.
        expires_at = time.time() + lifetime if job.output_url_seconds else None
        images: list[OutputImage] = []
        try:
            for image in item.generation.images:
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
                if images[-1].file_name:  # a bucket's URL for it, valid as long as the client asked
                    url = self.storage.read_url(images[-1].file_name, lifetime)
                    images[-1] = images[-1].model_copy(update={"url": url, "url_expires_at": expires_at})
        except BaseException:
            self._delete(images)  # a job that fails leaves no files behind
            raise
        return images

    def _result(self, item: Finished, images: list[OutputImage], store_seconds: float) -> JobResult:
        generation = item.generation
        timings = {"inference": item.seconds, **generation.timings}
        if item.idle_before is not None:
            timings["device_idle_before"] = item.idle_before
        timings["store"] = store_seconds
        return JobResult(
            images=images,
            seed=generation.seed,
            prompt=item.job.record.job.prompt,
            has_nsfw_concepts=generation.has_nsfw_concepts,
            nsfw_checked=generation.nsfw_checked,
            timings=timings,
            preset=generation.preset,
            preset_note=generation.preset_note,
        )

    def _complete(self, job: HeldJob, result: JobResult) -> bool:
        """`complete`, retried while the queue is unreachable. After a failed try, a False
        may be our own earlier COMMIT whose acknowledgement was lost: the record decides."""
        backoff = Backoff()
        retried = False
        give_up_at: float | None = None
        while True:
            try:
                done = self.queue.complete(job.id, self.worker_id, result)
            except Exception as exc:
                if not is_queue_outage(exc):
                    raise
                self.outage.failed(exc, f"completing job {job.id}")
                retried = True
                if self.stopping.is_set():  # stopping: the lease runs out, the job is retried
                    give_up_at = give_up_at or time.monotonic() + STOPPING_PATIENCE_SECONDS
                    if time.monotonic() >= give_up_at:
                        raise
                time.sleep(min(backoff.next_delay(), 1.0) if self.stopping.is_set() else backoff.next_delay())
                continue
            self.outage.succeeded()
            if done or not retried:
                return done
            record = until_back(
                lambda: self.queue.get(job.id, with_logs=False), doing="reading a job", outage=self.outage
            )
            # Ours when the stored result is exactly the one this worker sent.
            return record is not None and record.result == result and record.worker == self.worker_id

    def _delete(self, images: list[OutputImage]) -> None:
        """Best effort: what cannot be deleted now (a store outage) the orphan sweep deletes."""
        for image in images:
            if image.file_name:
                with contextlib.suppress(OSError):
                    self.storage.delete(image.file_name)
