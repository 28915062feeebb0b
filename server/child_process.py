"""Tying a child process's life to its parent's (Linux), for the supervisor and the API's
process manager: a child must not outlive a parent that was killed outright."""

from __future__ import annotations

import signal


def set_parent_death_signal(signum: int = signal.SIGTERM) -> None:
    """In a child process: get `signum` when the parent dies (even by SIGKILL)."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signum)
    except (OSError, AttributeError):
        pass
