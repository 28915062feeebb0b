"""The one place that turns the settings into a queue backend."""

from __future__ import annotations

from server.config import Settings
from server.queue.base import JobQueue


def open_queue(settings: Settings, *, role: str) -> JobQueue:
    """The queue every process of this install shares. `role` names the process kind
    ("api", "worker", "supervisor", or a tool's name): wake-ups go to processes by role."""
    from server.queue.sqlite import SQLiteQueue

    return SQLiteQueue(settings.db_path, settings.run_dir, role=role, lease_seconds=settings.lease_seconds)
