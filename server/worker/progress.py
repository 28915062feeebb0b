"""The progress relay: the one thread between the denoising loop and the queue.

The denoising thread launches the device's work step after step; a queue round trip on it
(an SQLite write, a PostgreSQL statement, a wait through an outage) is time in which it
launches nothing, so the device may sit idle. So at each step it only records the step in
memory (`HeldJob.stepped`), and reads a cancel request from memory (`HeldJob.cancel_requested`).
This thread does the queue's part, every RELAY_INTERVAL_SECONDS:

- it writes the steps done since its last write, one "step i/N" line each (clients read
  every step in a job's logs), the progress with the last of them;
- it reads the queue's cancel flag of each job still on the device, so that a cancel stops
  a job within about RELAY_INTERVAL_SECONDS plus one step.

The first and the last step wake it at once (`wake`), so that the progress shows as soon as
the denoising starts, and "step N/N" with a progress of 1 while the images are decoded. The
finisher calls `flush(job, final=True)` before it writes a job's last lines, so that the step
lines always come first and none after them. A queue outage skips a pass (writes that only
inform must not wait for the queue); the lines not written are written on the next pass,
unless the job ended meanwhile.
"""

from __future__ import annotations

import threading

from server.queue.base import JobQueue
from server.worker.held import HeldJob, HeldJobs
from server.worker.retry import QueueOutage, best_effort

# At most two writes and two reads per second per job: the queue's figures stay fresh for
# clients polling a status, a cancel stops a job within about a second.
RELAY_INTERVAL_SECONDS = 0.5


class ProgressRelay:
    def __init__(
        self, queue: JobQueue, held: HeldJobs, outage: QueueOutage, interval: float = RELAY_INTERVAL_SECONDS
    ) -> None:
        self.queue, self.held, self.outage, self.interval = queue, held, outage, interval
        self.stop = threading.Event()
        self._wake = threading.Event()
        self._writing = threading.Lock()  # one writer of a job's lines at a time (relay or flush)

    def wake(self) -> None:
        """Run a pass now (the first or last step ended). Safe from the denoising thread: no I/O."""
        self._wake.set()

    def run(self) -> None:
        while not self.stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            self.relay_all()

    def relay_all(self) -> None:
        for job in self.held.snapshot():
            self.flush(job)
            if job.generating and not job.cancel_requested:
                job.cancel_requested = best_effort(
                    lambda job=job: self.queue.is_cancel_requested(job.id),
                    False,
                    doing="reading a cancel flag",
                    outage=self.outage,
                )

    def flush(self, job: HeldJob, *, final: bool = False) -> None:
        """Write the step lines of `job` not written yet (on the caller's thread). `final`:
        its last chance; lines the queue does not take now are given up."""
        with self._writing:
            self._write(job)
            if final:
                job.written = job.progress

    def _write(self, job: HeldJob) -> None:
        if job.released:  # it ended (cancelled, failed) while its lines waited: too late
            return
        step, total = job.progress
        written_step, written_total = job.written
        # A job run again one image at a time after an out-of-memory counts its steps anew,
        # over a new total: its lines start again from step 1.
        first = written_step + 1 if total == written_total and step >= written_step else 1
        for i in range(first, step + 1):
            line, progress = f"step {i}/{total}", (step / total if i == step else None)
            if not best_effort(
                lambda line=line, progress=progress: self._log(job, line, progress),
                False,
                doing="logging progress",
                outage=self.outage,
            ):
                return  # the queue is down: the next pass writes the rest
            job.written = (i, total)

    def _log(self, job: HeldJob, line: str, progress: float | None) -> bool:
        self.queue.log(job.id, line, progress=progress)
        return True
