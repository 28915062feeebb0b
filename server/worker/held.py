"""The jobs this worker holds a lease on, each with what it is doing right now.

A job is held from its claim until exactly one of these ends it: completed, failed, requeued
or abandoned (its lease was lost, or the watchdog gave up on it). While held:
- the heartbeat renews its lease (`HeldJobs.renewable`);
- its `stage` and the time of its last progress (a denoising step or a stage change) tell the
  watchdog whether the device is still working on it;
- `lease_lost` (set by the heartbeat when a renewal is refused: the job belongs to someone
  else now) makes the generation stop at its next step;
- `progress` (the last denoising step, set by the denoising thread) is what the progress
  relay (server/worker/progress.py) writes to the queue, and `cancel_requested` is what it
  read there: the denoising thread itself never waits on the queue.

Fields are written by one thread at a time (the main loop while generating, the finisher
while storing, the relay for `cancel_requested` and what it wrote) and read by the others;
single attribute writes need no lock under the GIL (`progress` is one tuple, so that its
step and total are always read together), the registry itself has one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum

from server.jobs import JobRecord


class Stage(str, Enum):
    FETCHING_LORAS = "fetching LoRAs"
    ENCODING = "encoding the prompt"
    DENOISING = "denoising"
    DECODING = "decoding"  # after the last step: the VAE and the safety checker
    HANDED_OVER = "waiting for the finisher"
    STORING = "storing"
    COMPLETING = "completing"  # writing the result to the queue (waits out outages)


# Stages in which the worker itself must make progress; a job waiting behind another (handed
# over) or waiting for the queue to come back (completing) is not hung.
WATCHED = frozenset({Stage.FETCHING_LORAS, Stage.ENCODING, Stage.DENOISING, Stage.DECODING, Stage.STORING})
# Stages before the hand-over to the finisher: the job is the main loop's, on the device.
GENERATING = frozenset({Stage.FETCHING_LORAS, Stage.ENCODING, Stage.DENOISING, Stage.DECODING})


@dataclass(eq=False)
class HeldJob:
    record: JobRecord
    stage: Stage = Stage.FETCHING_LORAS
    progress: tuple[int, int] = (0, 0)  # (step, total steps) of the last denoising step
    progressed_at: float = field(default_factory=time.monotonic)
    lease_lost: bool = False
    hung: bool = False  # the watchdog gave up on it: its lease is no longer renewed
    cancel_requested: bool = False  # a client asked to cancel it (read from the queue by the relay)
    written: tuple[int, int] = (0, 0)  # the last step line the relay wrote to the queue
    released: bool = False  # it ended (any way): nothing more is written for it

    @property
    def id(self) -> str:
        return self.record.id

    def enter(self, stage: Stage) -> None:
        self.stage = stage
        self.progressed_at = time.monotonic()

    @property
    def generating(self) -> bool:
        """Still on the device (not yet handed to the finisher): a cancel can stop it."""
        return self.stage in GENERATING

    def stepped(self, step: int, total: int) -> None:
        """A denoising step ended; after the last one the images are decoded. Memory only:
        this runs on the denoising thread."""
        self.progress = (step, total)
        self.stage = Stage.DENOISING if step < total else Stage.DECODING
        self.progressed_at = time.monotonic()

    def stalled_for(self, now: float) -> float | None:
        """Seconds without progress in a watched stage; None in any other stage."""
        return now - self.progressed_at if self.stage in WATCHED else None

    def describe(self) -> str:
        step, total = self.progress
        steps = f" (step {step}/{total})" if total else ""
        return f"job {self.id} {self.stage.value}{steps}"


class HeldJobs:
    def __init__(self) -> None:
        self._jobs: dict[str, HeldJob] = {}
        self._lock = threading.Lock()

    def hold(self, record: JobRecord) -> HeldJob:
        job = HeldJob(record)
        with self._lock:
            self._jobs[record.id] = job
        return job

    def release(self, job: HeldJob) -> None:
        """The job ended (any way): its lease is no longer this worker's business."""
        job.released = True
        with self._lock:
            self._jobs.pop(job.id, None)

    def snapshot(self) -> list[HeldJob]:
        with self._lock:
            return list(self._jobs.values())

    def renewable(self) -> list[HeldJob]:
        return [job for job in self.snapshot() if not job.lease_lost and not job.hung]
