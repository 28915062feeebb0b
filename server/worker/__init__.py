"""The worker process: load the model once, then claim -> generate -> store -> complete.

Modules, one responsibility each:
- loop.py: `Worker`, the main loop (claim, generate, hand over) and how the process ends;
- held.py: the jobs it holds a lease on, with each one's stage and last progress;
- generation.py: one job on the runtime, with the out-of-memory fallback;
- finisher.py: the thread that stores the images and completes the job;
- heartbeat.py: the threads that renew leases and watch for a hung device;
- progress.py: the thread that writes step lines and progress and reads cancel flags, so
  that the denoising thread never waits on the queue;
- outcomes.py: the one place a held job ends (failed, requeued, completed, abandoned);
- faults.py: what went wrong (queue outage, storage, GPU) and the policy for each;
- retry.py: backoff and the shared view of a queue outage;
- state.py: the worker's row in the registry (/health), written by its own thread;
- threads.py: helper threads whose death ends the process;
- request.py: a job as the runtime's request, and the errors a job ends with;
- main.py: `run_worker`, the `flux-server worker` process (GPU choice, signals).

Threads: the main loop; the finisher; the heartbeat; the watchdog; the progress relay; the
state writer. A queue
that cannot be reached is waited out by each of them with backoff (0.5 s doubling to 15 s)
and never fails a job; SIGTERM stops the worker cleanly (the running job goes back to the
head of the queue without counting as an attempt, finished images are stored, exit 0).
"""

from server.worker.loop import Worker
from server.worker.main import run_worker
from server.worker.request import generation_request

__all__ = ["Worker", "generation_request", "run_worker"]
