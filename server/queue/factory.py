"""The one place that turns the settings into a queue backend."""

from __future__ import annotations

from server.config import Settings
from server.queue.base import JobQueue

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_queue(settings: Settings, *, role: str) -> JobQueue:
    """The queue every process of this install shares: SQLite in the data directory, or the
    PostgreSQL server of `settings.queue_url`. `role` names the process kind ("api",
    "worker", "supervisor", or a tool's name): wake-ups go to processes by role, and a worker
    waits out a database outage where the API answers 503 at once.

    Raises `QueueUnavailable` (one line: where, and why) when the database cannot be reached,
    and ValueError for a URL of another kind."""
    url = settings.queue_url
    if url is None:
        from server.queue.sqlite import SQLiteQueue

        return SQLiteQueue(
            settings.db_path, settings.run_dir, role=role, lease_seconds=settings.lease_seconds
        )
    if not url.startswith(POSTGRES_SCHEMES):
        raise ValueError("--queue-url must be a postgresql://user:password@host:port/dbname URL")
    from server.queue.postgres import PostgresQueue

    return PostgresQueue(url, role=role, lease_seconds=settings.lease_seconds)
