"""The `flux_deliveries` table: one row per completed job with a webhook, written by the
transaction that completed it (see `PostgresStore._finish`). Dispatchers on every box lease
due rows with `FOR UPDATE SKIP LOCKED`, so each attempt is made by exactly one of them."""

from __future__ import annotations

import psycopg

from server.queue.base import Delivery
from server.queue.postgres.store import PostgresStore
from server.queue.postgres.wakeups import DELIVERIES_KEY

_PENDING = "delivered_at IS NULL AND NOT gave_up"


class PostgresDeliveries(PostgresStore):
    def lease_deliveries(self, now: float, limit: int, hold_until: float) -> list[Delivery]:
        def lease(conn: psycopg.Connection) -> list[tuple]:
            return conn.execute(
                "UPDATE flux_deliveries d SET due_at = %s FROM ("
                f"SELECT request_id, due_at FROM flux_deliveries WHERE {_PENDING} AND due_at <= %s "
                "ORDER BY due_at LIMIT %s FOR UPDATE SKIP LOCKED) due "
                "WHERE d.request_id = due.request_id RETURNING d.request_id, due.due_at, d.attempts",
                (hold_until, now, limit),
            ).fetchall()

        rows = sorted(self._run(lease), key=lambda row: row[1])
        return [Delivery(request_id, due_at, attempts) for request_id, due_at, attempts in rows]

    def next_delivery_due(self) -> float | None:
        row = self._run(
            lambda conn: conn.execute(f"SELECT MIN(due_at) FROM flux_deliveries WHERE {_PENDING}").fetchone()
        )
        return row[0] if row else None

    def delivery_succeeded(self, request_id: str, attempts: int, now: float) -> None:
        self._run(
            lambda conn: conn.execute(
                "UPDATE flux_deliveries SET attempts = %s, delivered_at = %s, last_error = NULL "
                "WHERE request_id = %s",
                (attempts, now, request_id),
            )
        )

    def delivery_failed(self, request_id: str, attempts: int, error: str, next_due_at: float | None) -> None:
        def record(conn: psycopg.Connection) -> None:
            conn.execute(
                "UPDATE flux_deliveries SET attempts = %s, last_error = %s, due_at = COALESCE(%s, due_at), "
                "gave_up = %s WHERE request_id = %s",
                (attempts, error, next_due_at, next_due_at is None, request_id),
            )
            if next_due_at is not None:
                self._notify(conn, [DELIVERIES_KEY])  # other boxes' dispatchers learn the new time

        self._tx(record)

    def delivery(self, request_id: str) -> Delivery | None:
        row = self._run(
            lambda conn: conn.execute(
                "SELECT request_id, due_at, attempts, last_error, delivered_at, gave_up "
                "FROM flux_deliveries WHERE request_id = %s",
                (request_id,),
            ).fetchone()
        )
        return Delivery(*row) if row else None

    async def wait_for_deliveries(self, timeout: float) -> None:
        await self.wakeups.wait_for(DELIVERIES_KEY, timeout)
