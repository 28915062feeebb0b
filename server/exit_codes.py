"""Exit statuses of flux-server's processes, and what the supervisor does about each.

A worker's exit status tells the supervisor why it ended, so that a restart is fast where a
fresh process fixes the cause (a dead CUDA context, a hung device, a crashed helper thread)
and slow where it probably does not (a model that cannot load: retried after a long backoff,
because a transient out-of-memory or a weights mount that came back late is not forever).
"""

from __future__ import annotations

EXIT_OK = 0  # stopped on request (SIGTERM/SIGINT): nothing to restart at shutdown
EXIT_CRASHED = 1  # an unexpected error (Python's own status for an uncaught exception)
EXIT_USAGE = 2  # bad configuration or command line: refused to start
EXIT_LOAD_FAILED = 3  # the model could not be loaded or warmed up: retry after a long backoff
EXIT_DEVICE_LOST = 4  # the GPU context is unusable (a sticky CUDA error): restart at once
EXIT_HUNG = 5  # the watchdog saw no step progress on a held job: restart at once
EXIT_HELPER_DIED = 6  # a helper thread (heartbeat, finisher) died: restart with backoff
EXIT_FAILING = 7  # too many internal failures in a row: stop draining the queue; restart with backoff

DESCRIPTIONS: dict[int, str] = {
    EXIT_OK: "stopped",
    EXIT_CRASHED: "crashed",
    EXIT_USAGE: "refused its configuration",
    EXIT_LOAD_FAILED: "could not load the model",
    EXIT_DEVICE_LOST: "lost its GPU context",
    EXIT_HUNG: "made no progress on its job (watchdog)",
    EXIT_HELPER_DIED: "lost a helper thread",
    EXIT_FAILING: "failed too many jobs in a row",
}


def describe(code: int) -> str:
    """`could not load the model (exit status 3)`; signals as `killed by SIGKILL`."""
    if code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"{DESCRIPTIONS.get(code, 'exited')} (exit status {code})"
