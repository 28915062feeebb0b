#!/usr/bin/env python
"""API and queue benchmark (not a test): what the server adds on top of the model.

Starts real `flux-server serve` processes on loopback with the tiny model at its smallest
size (64x64, 1 step) and measures:

1. dispatch latency: client sends submit -> a worker claims the job (idle server);
2. the worker's idle time between consecutive jobs on a busy worker (everything a worker
   does per job outside `FluxRuntime.generate`: claim, logs, hand-off to the finisher);
3. submit latency under a burst of N concurrent submits (p50/p99), all accepted, none lost;
4. status requests per second while 500 jobs wait (with `wrk` when installed).

Phases 3 and 4 run against the API process alone (`flux-server api`, no worker): on a GPU box
the worker computes on the GPU, while on a 2-core CPU box a busy CPU worker would take the
cores the API needs.

    .venv/bin/python scripts/bench_api.py [--burst 1000] [--api-processes N] [--out results.json]
    .venv/bin/python scripts/bench_api.py --queue-url [postgresql://...]   # the same on PostgreSQL
    .venv/bin/python scripts/bench_api.py --tenant-key   # auth on, a named key with quotas

With `--queue-url` and no URL the script starts a local PostgreSQL server of its own (the
binaries of the `pgserver` package, else Debian's); with a URL, that database's flux_* tables
are emptied before each phase: give it a scratch database. `wrk` is installed from Debian when
missing (apt-get), as for the recorded figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.config import Settings  # noqa: E402
from server.jobs import Status  # noqa: E402
from server.queue.base import JobQueue  # noqa: E402
from server.queue.factory import open_queue  # noqa: E402
from server.tenants import Quotas, Role  # noqa: E402
from server.tenants.keys import KeyEntry, KeysFile, hash_token, new_token, save  # noqa: E402

START_POSTGRES = "start"  # `--queue-url` given without a URL
INPUT = {"prompt": "bench", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}
SUBMIT_PATH = "/fal-ai/flux/dev"
# With --tenant-key: the Authorization header of every request, a named user key whose quotas
# are all checked on each submit (high enough never to refuse one).
HEADERS: dict[str, str] = {}
TENANT_TOKEN = new_token()
TENANT = KeyEntry(
    name="bench",
    role=Role.USER,
    sha256=hash_token(TENANT_TOKEN),
    quotas=Quotas(queued=10**6, per_minute=10**6, images_per_day=10**7),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(
    data_dir: Path, workers: int, api_processes: int = 1, queue_url: str | None = None
) -> Iterator[str]:
    port = free_port()
    if HEADERS:  # --tenant-key: the key file the server reads from its data directory
        save(data_dir / "keys.json", KeysFile().with_entry(TENANT))
    log = open(data_dir / f"serve-{workers}.log", "w")  # noqa: SIM115 - closed below
    # No workers: the API process alone (`flux-server api`), as on a box whose workers run
    # elsewhere.
    command = ["serve", "--workers", str(workers)] if workers else ["api"]
    command += ["--api-processes", str(api_processes)]
    if queue_url is not None:
        command += ["--queue-url", queue_url]
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.supervisor.cli", *command, "--model", "tiny", "--device", "cpu",
         "--data-dir", str(data_dir), "--port", str(port)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                response = httpx.get(base + "/health", timeout=2)
                # Every API process must be up: the first one ready would take every connection.
                started = Path(log.name).read_text().count("Application startup complete")
                if started >= api_processes and (
                    response.status_code == 200 or (workers == 0 and response.status_code == 503)
                ):
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited; see {log.name}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"server not ready; see {log.name}")
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def wait_completed(queue: JobQueue, ids: list[str], timeout: float = 300) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        records = [queue.get(i, with_logs=False) for i in ids]
        if all(r is not None and r.status is Status.COMPLETED for r in records):
            return records
        time.sleep(0.005)
    raise TimeoutError("jobs did not complete")


def measure_dispatch(base: str, queue: JobQueue, n: int) -> dict:
    latencies = []
    with httpx.Client(base_url=base, headers=HEADERS) as client:
        for _ in range(n):
            sent = time.time()
            request_id = client.post(SUBMIT_PATH, json=INPUT).json()["request_id"]
            (record,) = wait_completed(queue, [request_id])
            latencies.append((record.started_at - sent) * 1000)
    return {"n": n, "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
            "max_ms": max(latencies)}  # fmt: skip


def measure_gap(base: str, queue: JobQueue, n: int) -> dict:
    with httpx.Client(base_url=base, headers=HEADERS) as client:
        ids = [client.post(SUBMIT_PATH, json=INPUT).json()["request_id"] for _ in range(n)]
    records = sorted(wait_completed(queue, ids), key=lambda r: r.started_at)
    # Between the first and the last claim the worker ran n-1 whole jobs; what is not inside
    # generate() is the worker's own time per job, i.e. the device idling on Python.
    span = records[-1].started_at - records[0].started_at
    generate = sum(r.result.timings["inference"] for r in records[:-1])
    per_job_ms = (span - generate) / (n - 1) * 1000
    return {"n": n, "idle_per_job_ms": per_job_ms, "generate_mean_ms": generate / (n - 1) * 1000}


async def fire_burst(port: int, n: int) -> list[tuple[int, float]]:
    body = json.dumps(INPUT).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in HEADERS.items())
    request = (
        f"POST {SUBMIT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    # Connect first, then fire every request at once: the burst measures the server, not
    # 1000 TCP handshakes queued in the listen backlog.
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
    start = asyncio.Event()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, float]:
        await start.wait()
        sent = time.perf_counter()
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))  # fmt: skip
        await reader.readexactly(length)
        elapsed = (time.perf_counter() - sent) * 1000
        writer.close()
        return int(head.split(b" ")[1]), elapsed

    tasks = [asyncio.create_task(one(r, w)) for r, w in connections]
    await asyncio.sleep(0.05)
    start.set()
    return await asyncio.gather(*tasks)


def measure_burst(base: str, queue: JobQueue, n: int) -> dict:
    before = queue.depth()
    results = asyncio.run(fire_burst(int(base.rsplit(":", 1)[1]), n))
    latencies = [ms for _, ms in results]
    accepted = sum(1 for status, _ in results if status == 200)
    return {"n": n, "accepted": accepted, "stored": queue.depth() - before,
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies)}  # fmt: skip


def measure_status_rps(base: str, queue: JobQueue, waiting: int, seconds: int) -> dict:
    with httpx.Client(base_url=base, headers=HEADERS) as client:
        ids = [client.post(SUBMIT_PATH, json=INPUT).json()["request_id"] for _ in range(waiting)]
    target = f"{base}/fal-ai/flux/requests/{ids[len(ids) // 2]}/status?logs=1"
    return status_rate(target, seconds, queue.depth())


def status_rate(target: str, seconds: int, queued: int) -> dict:
    """Requests per second on one status URL: `wrk -t1 -c32` when installed, else httpx."""
    if shutil.which("wrk"):
        headers = [arg for name, value in HEADERS.items() for arg in ("-H", f"{name}: {value}")]
        out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", "--latency", *headers, target],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        rps = float(next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec")))
        p99 = next(line.split()[1] for line in out.splitlines() if line.strip().startswith("99%"))
        return {"tool": "wrk -t1 -c32", "queued": queued, "rps": rps, "p99": p99}
    return asyncio.run(_status_loop(target, seconds, queued))


async def _status_loop(target: str, seconds: int, queued: int) -> dict:
    count = 0
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(headers=HEADERS) as client:

        async def loop() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                (await client.get(target)).raise_for_status()
                count += 1

        await asyncio.gather(*(loop() for _ in range(16)))
    return {"tool": "httpx x16 (wrk not installed)", "queued": queued, "rps": count / seconds}


def ensure_wrk() -> None:
    """The load generator of the recorded figures, from Debian when it is missing."""
    if shutil.which("wrk") is None and shutil.which("apt-get") is not None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
        if shutil.which("wrk") is None:
            subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)


class Queues:
    """Where each phase's queue lives: SQLite in the phase's data directory, or an empty
    PostgreSQL database (a new one on a server the script started, or the given one emptied)."""

    def __init__(self, queue_url: str | None, tmp: Path) -> None:
        self.postgres = None
        self.url = queue_url
        if queue_url == START_POSTGRES:
            from tests.pg_server import start_postgres  # the test suite's local server

            self.postgres = start_postgres(tmp / "postgres")

    def phase_url(self) -> str | None:
        if self.postgres is not None:
            return self.postgres.fresh_database_url()
        if self.url is not None:
            import psycopg

            with psycopg.connect(self.url, autocommit=True) as conn:
                tables = [
                    r[0]
                    for r in conn.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'flux\\_%'")
                ]
                wanted = [
                    t for t in tables if t in ("flux_jobs", "flux_logs", "flux_deliveries", "flux_workers")
                ]
                if wanted:
                    conn.execute(f"TRUNCATE {', '.join(wanted)}")
        return self.url

    def describe(self) -> str:
        if self.url is None:
            return f"SQLite {sqlite3.sqlite_version}"
        import psycopg

        url = self.postgres.url() if self.postgres is not None else self.url
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        where = "started by the script, on this machine" if self.postgres is not None else "given URL"
        return f"PostgreSQL {version} ({where}; psycopg {psycopg.__version__})"

    def close(self) -> None:
        if self.postgres is not None:
            from tests.pg_server import remove

            remove(self.postgres)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--dispatch-jobs", type=int, default=30)
    parser.add_argument("--gap-jobs", type=int, default=40)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--waiting", type=int, default=500)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--api-processes", type=int, default=1, help="passed to `serve` and `api`")
    parser.add_argument(
        "--tenant-key", action="store_true",
        help="auth on: every request with a named user key whose three quotas are checked",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument(
        "--queue-url", nargs="?", const=START_POSTGRES, default=None,
        help="PostgreSQL queue: this URL (its flux_* tables are emptied), or with no URL a local server",
    )  # fmt: skip
    args = parser.parse_args()
    if args.tenant_key:
        HEADERS["Authorization"] = f"Key {TENANT_TOKEN}"
    ensure_wrk()

    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "api_processes": args.api_processes,
        "tenant_key": args.tenant_key,
    }
    with tempfile.TemporaryDirectory(prefix="flux-bench-") as tmp:
        queues = Queues(args.queue_url, Path(tmp))
        try:
            results["queue"] = queues.describe()
            busy_dir, idle_dir = Path(tmp) / "busy", Path(tmp) / "queue-only"
            busy_dir.mkdir()
            idle_dir.mkdir()
            url = queues.phase_url()
            with running_server(busy_dir, workers=1, api_processes=args.api_processes, queue_url=url) as base:
                queue = open_queue(Settings(data_dir=busy_dir, queue_url=url), role="bench")
                results["dispatch"] = measure_dispatch(base, queue, args.dispatch_jobs)
                results["inter_job"] = measure_gap(base, queue, args.gap_jobs)
                queue.close()
            url = queues.phase_url()
            with running_server(idle_dir, workers=0, api_processes=args.api_processes, queue_url=url) as base:
                queue = open_queue(Settings(data_dir=idle_dir, queue_url=url), role="bench")
                results["burst"] = measure_burst(base, queue, args.burst)
                queue.close()
            # A fresh queue-only server, so that exactly `waiting` jobs wait.
            shutil.rmtree(idle_dir)
            idle_dir.mkdir()
            url = queues.phase_url()
            with running_server(idle_dir, workers=0, api_processes=args.api_processes, queue_url=url) as base:
                queue = open_queue(Settings(data_dir=idle_dir, queue_url=url), role="bench")
                results["status"] = measure_status_rps(base, queue, args.waiting, args.seconds)
                queue.close()
        finally:
            queues.close()

    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
