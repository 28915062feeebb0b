"""The SQLite queue's reads: a request, its position, the queue's counts and a tenant's, the
usage table. Each is one statement on the calling thread's own connection (store.py)."""

from __future__ import annotations

from server.jobs import JobRecord, Status
from server.queue.base import QueueCounts
from server.queue.records import PRIORITY_RANK
from server.queue.sqlite.store import RECORD_COLUMNS, SQLiteStore
from server.queue.usage import USAGE_TOTALS_SQL, UsageRow


class SQLiteReads(SQLiteStore):
    def usage(self, first_day: str | None = None, last_day: str | None = None) -> list[UsageRow]:
        rows = self._conn().execute(
            "SELECT day, tenant, app_id, requests, failed, images, pixels, gpu_seconds FROM tenant_usage "
            "WHERE day >= ? AND day <= ? ORDER BY day, tenant, app_id",
            (first_day or "", last_day or "9999-12-31"),
        )
        return [UsageRow(*row) for row in rows]

    def usage_totals(self) -> list[UsageRow]:
        rows = self._conn().execute(USAGE_TOTALS_SQL.format(table="tenant_usage"))
        return [UsageRow(*row) for row in rows]

    def get(self, request_id: str, *, with_logs: bool = True) -> JobRecord | None:
        conn = self._conn()
        row = conn.execute(f"SELECT {RECORD_COLUMNS} FROM jobs WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        return self._record(row, self._logs(conn, request_id) if with_logs else [])

    def position(self, request_id: str) -> int | None:
        # The higher classes' counts, then one index range count of the jobs before it in its
        # own class: the cost grows with the position in the class, not with the queue length.
        row = (
            self._conn()
            .execute(
                "SELECT j.status, "
                "(SELECT COALESCE(SUM(queued), 0) FROM queue_counts c "
                "WHERE c.priority_rank < j.priority_rank) + "
                # Two plain index ranges: a row-value comparison would filter row by row.
                "(SELECT COUNT(*) FROM jobs q WHERE q.status = 'IN_QUEUE' "
                "AND q.priority_rank = j.priority_rank AND q.fair_tag < j.fair_tag) + "
                "(SELECT COUNT(*) FROM jobs q WHERE q.status = 'IN_QUEUE' "
                "AND q.priority_rank = j.priority_rank AND q.fair_tag = j.fair_tag AND q.seq < j.seq) "
                "FROM jobs j WHERE j.id = ?",
                (request_id,),
            )
            .fetchone()
        )
        if row is None or row[0] != Status.IN_QUEUE.value:
            return None
        return int(row[1])

    def depth(self) -> int:
        (count,) = self._conn().execute("SELECT COALESCE(SUM(queued), 0) FROM queue_counts").fetchone()
        return int(count)

    def active_count(self, tenant: str | None) -> int:
        (count,) = (
            self._conn()
            .execute(
                "SELECT (SELECT COUNT(*) FROM jobs INDEXED BY jobs_tenant_queue "
                "WHERE COALESCE(tenant, '') = ?1 AND status = 'IN_QUEUE') + "
                "(SELECT COUNT(*) FROM jobs INDEXED BY jobs_lease "
                "WHERE status = 'IN_PROGRESS' AND COALESCE(tenant, '') = ?1)",
                (tenant or "",),
            )
            .fetchone()
        )
        return int(count)

    def counts(self) -> QueueCounts:
        conn = self._conn()
        by_rank = dict(conn.execute("SELECT priority_rank, queued FROM queue_counts").fetchall())
        queued = {priority: int(by_rank.get(rank, 0)) for priority, rank in PRIORITY_RANK.items()}
        # The lease index holds exactly the running jobs.
        (running,) = conn.execute(
            "SELECT COUNT(*) FROM jobs INDEXED BY jobs_lease WHERE status = 'IN_PROGRESS'"
        ).fetchone()
        return QueueCounts(queued=queued, running=int(running))
