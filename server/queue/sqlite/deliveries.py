"""The `deliveries` table: one row per completed job with a webhook, written by the
transaction that completed it (see `SQLiteStore._finish`), leased and updated by the
webhook dispatcher (server/api/webhooks/dispatch.py)."""

from __future__ import annotations

from server.queue.base import Delivery
from server.queue.sqlite.store import DELIVERIES_KEY, SQLiteStore

_PENDING = "delivered_at IS NULL AND gave_up = 0"


class SQLiteDeliveries(SQLiteStore):
    def lease_deliveries(self, now: float, limit: int, hold_until: float) -> list[Delivery]:
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT request_id, due_at, attempts FROM deliveries WHERE {_PENDING} AND due_at <= ? "
                "ORDER BY due_at LIMIT ?",
                (now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE deliveries SET due_at = ? WHERE request_id = ?",
                [(hold_until, request_id) for request_id, _, _ in rows],
            )
        return [Delivery(request_id, due_at, attempts) for request_id, due_at, attempts in rows]

    def next_delivery_due(self) -> float | None:
        (due,) = self._conn().execute(f"SELECT MIN(due_at) FROM deliveries WHERE {_PENDING}").fetchone()
        return due

    def delivery_succeeded(self, request_id: str, attempts: int, now: float) -> None:
        self._execute_write(
            "UPDATE deliveries SET attempts = ?, delivered_at = ?, last_error = NULL WHERE request_id = ?",
            (attempts, now, request_id),
        )

    def delivery_failed(self, request_id: str, attempts: int, error: str, next_due_at: float | None) -> None:
        self._execute_write(
            "UPDATE deliveries SET attempts = ?, last_error = ?, due_at = COALESCE(?, due_at), "
            "gave_up = ? WHERE request_id = ?",
            (attempts, error, next_due_at, int(next_due_at is None), request_id),
        )

    def delivery(self, request_id: str) -> Delivery | None:
        row = (
            self._conn()
            .execute(
                "SELECT request_id, due_at, attempts, last_error, delivered_at, gave_up FROM deliveries "
                "WHERE request_id = ?",
                (request_id,),
            )
            .fetchone()
        )
        return Delivery(*row[:5], gave_up=bool(row[5])) if row else None

    async def wait_for_deliveries(self, timeout: float) -> None:
        await self.notifier.wait_for(DELIVERIES_KEY, timeout)
