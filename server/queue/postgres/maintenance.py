"""Upkeep of the PostgreSQL queue: lost leases and start deadlines, the retention purge (one
process at a time across every box, under an advisory lock), and the worker registry."""

from __future__ import annotations

import os
import time

import psycopg

from server.jobs import JobRecord, cancelled_error, disconnected_error
from server.queue.base import MAX_ATTEMPTS, PURGE_BATCH, WorkerInfo
from server.queue.postgres.schema import PURGE_LOCK
from server.queue.postgres.store import DB_NOW, RECORD_COLUMNS, REQUEUE, PostgresStore
from server.queue.postgres.wakeups import SUBMIT_KEY, WORKERS_KEY
from server.queue.records import file_names_in_results


class PostgresMaintenance(PostgresStore):
    # --- maintenance ---------------------------------------------------------------------
    def recover_expired(self) -> list[str]:
        due = self._run(
            lambda conn: conn.execute(
                "SELECT EXISTS (SELECT 1 FROM flux_jobs WHERE status = 'IN_PROGRESS' "
                f"AND lease_expires < {DB_NOW}) OR EXISTS (SELECT 1 FROM flux_jobs WHERE status = 'IN_QUEUE' "
                f"AND start_deadline IS NOT NULL AND start_deadline < {DB_NOW})"
            ).fetchone()
        )
        if not due or not due[0]:
            return []
        return self._recover(f"lease_expires < {DB_NOW}", (), deadlines=True)

    def release_worker(self, worker_id: str) -> list[str]:
        return self._recover("worker = %s", (worker_id,), deadlines=False)

    def _recover(self, condition: str, params: tuple, *, deadlines: bool) -> list[str]:
        def recover(conn: psycopg.Connection) -> list[str]:
            now = time.time()
            rows = conn.execute(
                "SELECT id, attempts, cancel_requested FROM flux_jobs "
                f"WHERE status = 'IN_PROGRESS' AND {condition} FOR UPDATE SKIP LOCKED",
                params,
            ).fetchall()
            requeued: list[str] = []
            finished: list[str] = []
            for request_id, attempts, cancel_requested in rows:
                if cancel_requested:
                    self._finish(conn, request_id, now, error=cancelled_error())
                    finished.append(request_id)
                elif attempts < MAX_ATTEMPTS:
                    conn.execute(f"UPDATE flux_jobs SET {REQUEUE} WHERE id = %s", (request_id,))
                    self._add_log(conn, request_id, "Worker lost; retrying", now)
                    requeued.append(request_id)
                else:
                    self._finish(conn, request_id, now, error=disconnected_error())
                    finished.append(request_id)
            if deadlines:
                finished += self._expire_deadlines(conn, now)
            if requeued:
                self._notify(conn, [*requeued, SUBMIT_KEY])
            return requeued + finished

        return self._tx(recover)

    def purge(self, older_than: float, limit: int = PURGE_BATCH) -> list[JobRecord]:
        def purge(conn: psycopg.Connection) -> list[tuple]:
            # One purger at a time across every box; the others find nothing to do.
            (locked,) = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PURGE_LOCK,)).fetchone()
            if not locked:
                return []
            rows = conn.execute(
                "DELETE FROM flux_jobs WHERE id IN (SELECT id FROM flux_jobs WHERE status = 'COMPLETED' "
                "AND completed_at < %s ORDER BY completed_at LIMIT %s FOR UPDATE SKIP LOCKED) "
                f"RETURNING {RECORD_COLUMNS}",
                (older_than, limit),
            ).fetchall()
            ids = [row[0] for row in rows]
            if ids:
                conn.execute("DELETE FROM flux_logs WHERE request_id = ANY(%s)", (ids,))
                conn.execute("DELETE FROM flux_deliveries WHERE request_id = ANY(%s)", (ids,))
            return rows

        records = [self._record(row, []) for row in self._tx(purge)]
        for record in records:
            self._jobs.forget(record.id)
        return records

    def result_file_names(self, completed_since: float) -> set[str]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT result_json FROM flux_jobs WHERE status = 'COMPLETED' AND completed_at >= %s "
                "AND result_json IS NOT NULL",
                (completed_since,),
            ).fetchall()
        )
        return file_names_in_results(result_json for (result_json,) in rows)

    # --- worker registry -----------------------------------------------------------------
    def set_worker_state(
        self, worker_id: str, state: str, *, device: str, model: str, detail: str = ""
    ) -> None:
        def upsert(conn: psycopg.Connection) -> None:
            conn.execute(
                "INSERT INTO flux_workers (worker_id, state, device, model, detail, pid, updated_at) "
                f"VALUES (%s, %s, %s, %s, %s, %s, {DB_NOW}) ON CONFLICT (worker_id) DO UPDATE SET "
                "state = EXCLUDED.state, device = EXCLUDED.device, model = EXCLUDED.model, "
                "detail = EXCLUDED.detail, pid = EXCLUDED.pid, updated_at = EXCLUDED.updated_at",
                (worker_id, state, device, model, detail, os.getpid()),
            )
            self._notify(conn, [WORKERS_KEY])

        self._tx(upsert)

    def remove_worker(self, worker_id: str) -> None:
        def remove(conn: psycopg.Connection) -> None:
            conn.execute("DELETE FROM flux_workers WHERE worker_id = %s", (worker_id,))
            self._notify(conn, [WORKERS_KEY])

        self._tx(remove)

    def workers(self) -> list[WorkerInfo]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT worker_id, state, device, model, detail, pid, updated_at FROM flux_workers "
                "ORDER BY worker_id"
            ).fetchall()
        )
        return [WorkerInfo(*row) for row in rows]
