"""The PostgreSQL backend: one database server shared by every box (psycopg 3 + psycopg_pool)."""

from server.queue.postgres.queue import PostgresQueue

__all__ = ["PostgresQueue"]
