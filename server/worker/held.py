"""The jobs this worker holds a lease on, each with what it is doing right now.

A job is held from its claim until exactly one of these ends it: completed, failed, requeued
or abandoned (its lease was lost, or the watchdog gave up on it). While held:
- the heartbeat renews its lease (`HeldJobs.renewable`);
- its `stage` and the time of its last progress (a denoising step or a stage change) tell the
  watchdog whether the device is still working on it;
- `lease_lost` (set by the heartbeat when a renewal is refused: the job belongs to someone
  else now) makes the generation stop at its next step.

Fields are written by one thread at a time (the main loop while generating, the finisher
while storing) and read by the heartbeat and the watchdog; single attribute writes need no
lock under the GIL, the registry itself has one.
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


@dataclass(eq=False)
class HeldJob:
    record: JobRecord
    stage: Stage = Stage.FETCHING_LORAS
    step: int = 0
    total_steps: int = 0
    progressed_at: float = field(default_factory=time.monotonic)
    lease_lost: bool = False
    hung: bool = False  # the watchdog gave up on it: its lease is no longer renewed

    @property
    def id(self) -> str:
        return self.record.id

    def enter(self, stage: Stage) -> None:
        self.stage = stage
        self.progressed_at = time.monotonic()

    def stepped(self, step: int, total: int) -> None:
        """A denoising step ended; after the last one the images are decoded."""
        self.step, self.total_steps = step, total
        self.stage = Stage.DENOISING if step < total else Stage.DECODING
        self.progressed_at = time.monotonic()

    def stalled_for(self, now: float) -> float | None:
        """Seconds without progress in a watched stage; None in any other stage."""
        return now - self.progressed_at if self.stage in WATCHED else None

    def describe(self) -> str:
        steps = f" (step {self.step}/{self.total_steps})" if self.total_steps else ""
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
        with self._lock:
            self._jobs.pop(job.id, None)

    def snapshot(self) -> list[HeldJob]:
        with self._lock:
            return list(self._jobs.values())

    def renewable(self) -> list[HeldJob]:
        return [job for job in self.snapshot() if not job.lease_lost and not job.hung]
