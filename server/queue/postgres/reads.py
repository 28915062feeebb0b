"""The PostgreSQL queue's reads: a request with its logs, its position, the queue's counts and
a tenant's, the usage table. Each is one statement, one round trip (store.py's `_run`)."""

from __future__ import annotations

from server.jobs import JobRecord, LogEntry, Status
from server.queue.base import QueueCounts
from server.queue.postgres.store import RECORD_COLUMNS, PostgresStore
from server.queue.records import PRIORITY_RANK
from server.queue.usage import USAGE_TOTALS_SQL, UsageRow


class PostgresReads(PostgresStore):
    def usage(self, first_day: str | None = None, last_day: str | None = None) -> list[UsageRow]:
        rows = self._run(
            lambda conn: conn.execute(
                "SELECT day, tenant, app_id, requests, failed, images, pixels, gpu_seconds FROM flux_usage "
                "WHERE day >= %s AND day <= %s ORDER BY day, tenant, app_id",
                (first_day or "", last_day or "9999-12-31"),
            ).fetchall()
        )
        return [UsageRow(*row) for row in rows]

    def usage_totals(self) -> list[UsageRow]:
        rows = self._run(lambda conn: conn.execute(USAGE_TOTALS_SQL.format(table="flux_usage")).fetchall())
        return [UsageRow(*row) for row in rows]

    def get(self, request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        # The record and its log lines in one statement: one round trip per status poll.
        row = self._run(
            lambda conn: conn.execute(
                f"SELECT {RECORD_COLUMNS}, CASE WHEN %s THEN (SELECT json_agg(json_build_array("
                "ts, level, source, message) ORDER BY l.id) FROM flux_logs l WHERE l.request_id = j.id) END "
                "FROM flux_jobs j WHERE j.id = %s",
                (with_logs, request_id),
            ).fetchone()
        )
        if row is None:
            return None
        logs = [
            LogEntry(timestamp=ts, level=level, source=source, message=message)
            for ts, level, source, message in row[-1] or []
        ]
        return self._record(row[:-1], logs)

    def position(self, request_id: str) -> int | None:
        # One range count over the queue index: the cost grows with the position, not with
        # the length of the queue.
        row = self._run(
            lambda conn: conn.execute(
                "SELECT j.status, (SELECT count(*) FROM flux_jobs q WHERE q.status = 'IN_QUEUE' "
                "AND (q.priority_rank, q.fair_tag, q.seq) < (j.priority_rank, j.fair_tag, j.seq)) "
                "FROM flux_jobs j WHERE j.id = %s",
                (request_id,),
            ).fetchone()
        )
        if row is None or row[0] != Status.IN_QUEUE.value:
            return None
        return int(row[1])

    def depth(self) -> int:
        row = self._run(
            lambda conn: conn.execute("SELECT count(*) FROM flux_jobs WHERE status = 'IN_QUEUE'").fetchone()
        )
        return int(row[0]) if row else 0

    def active_count(self, tenant: str | None) -> int:
        row = self._run(
            lambda conn: conn.execute(
                # Two reads, each on a partial index: queued by tenant, running by lease.
                "SELECT (SELECT count(*) FROM flux_jobs WHERE COALESCE(tenant, '') = %(t)s "
                "AND status = 'IN_QUEUE') + (SELECT count(*) FROM flux_jobs "
                "WHERE status = 'IN_PROGRESS' AND COALESCE(tenant, '') = %(t)s)",
                {"t": tenant or ""},
            ).fetchone()
        )
        return int(row[0]) if row else 0

    def counts(self) -> QueueCounts:
        # Queued and running rows only (completed ones, the bulk of the table, are not read).
        row = self._run(
            lambda conn: conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'IN_QUEUE' AND priority_rank = 0), "
                "count(*) FILTER (WHERE status = 'IN_QUEUE' AND priority_rank = 1), "
                "count(*) FILTER (WHERE status = 'IN_PROGRESS') FROM flux_jobs "
                "WHERE status IN ('IN_QUEUE', 'IN_PROGRESS')"
            ).fetchone()
        )
        normal, low, running = row if row else (0, 0, 0)
        by_rank = {0: int(normal), 1: int(low)}
        queued = {priority: by_rank.get(rank, 0) for priority, rank in PRIORITY_RANK.items()}
        return QueueCounts(queued=queued, running=int(running))
