"""The SQLite backend: one database file in the data directory, for one box."""

from server.queue.sqlite.queue import SQLiteQueue

__all__ = ["SQLiteQueue"]
