"""Connecting to the queue's PostgreSQL server: one-line descriptions of where and why a
connection failed (never the password), and the pool every handle uses."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from server.queue.base import QueueUnavailable

CONNECT_TIMEOUT_SECONDS = 5
# A pool that cannot reach the server keeps trying for this long per attempt, then gives up
# until the next caller asks (so reconnects happen within seconds of the server's return).
RECONNECT_TIMEOUT_SECONDS = 5.0


def describe(url: str) -> str:
    """`host:port/dbname` of a URL or conninfo string, without user or password."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparsable queue URL"
    host = str(parts.get("host") or "localhost")
    port = parts.get("port")
    where = f"{host}:{port}" if port else host
    return f"{where}/{parts.get('dbname') or parts.get('user') or ''}".rstrip("/")


def cause(exc: BaseException) -> str:
    """The first line of a driver error, which names the cause (refused, password, database)."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0].strip()
    # "connection failed: connection to server at "h" (::1), port 5 failed: Connection refused"
    return first.split("failed: ")[-1] if "failed: " in first else first


def unavailable(url: str, exc: BaseException) -> QueueUnavailable:
    return QueueUnavailable(f"the queue database at {describe(url)} is unavailable: {cause(exc)}")


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    """One connection, failing within `CONNECT_TIMEOUT_SECONDS` with a `QueueUnavailable`."""
    try:
        return psycopg.connect(url, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_SECONDS)
    except psycopg.Error as exc:
        raise unavailable(url, exc) from exc


def open_pool(url: str, *, max_size: int) -> ConnectionPool:
    """Autocommit connections: a read is one round trip; writes of several statements open
    a transaction themselves. Connections a server restart broke are found on first use
    (see `PostgresStore._with_connection`), not checked before every use."""
    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"connect_timeout": CONNECT_TIMEOUT_SECONDS, "autocommit": True},
        reconnect_timeout=RECONNECT_TIMEOUT_SECONDS,
        open=True,
        name="flux-queue",
    )
