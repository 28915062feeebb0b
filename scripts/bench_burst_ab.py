"""Burst A/B benchmark (not a test): the same 1000-submit burst against API processes of
several checkouts, alternated round by round, so that the machine's drift touches each alike.

`scripts/bench_api.py` measures one checkout at a time, and on a 2-core machine two runs of the
same code differ by up to 30 % at p50; here every server is started once, idle side by side,
and each round bursts every server in turn (order reversed every other round). Per server it
reports the median over rounds of the burst's p50 and p99 and of the CPU seconds the API
process spent on the burst (from /proc), the figure least moved by the machine's noise.

    .venv/bin/python scripts/bench_burst_ab.py \\
        --server before=/path/to/old/checkout:off --server key=.:key [--rounds 6] [--out r.json]

`NAME=CHECKOUT:MODE`: CHECKOUT's `server` package is run with this interpreter (its
dependencies must be installed in it); MODE `off` runs without keys, `key` with the named user
key of bench_api.py (all three quotas checked on every submit) in the data directory's keys
file. A server is warmed with a burst of 200 before the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_api

WARM_BURST = 200


@dataclass
class Server:
    name: str
    checkout: Path
    with_key: bool
    port: int = 0
    pid: int = 0
    rounds: list[tuple[float, float, float]] = field(default_factory=list)  # p50, p99 ms; CPU s

    @classmethod
    def parse(cls, text: str) -> Server:
        name, _, rest = text.partition("=")
        checkout, _, mode = rest.rpartition(":")
        if not name or not checkout or mode not in ("off", "key"):
            raise argparse.ArgumentTypeError(f"expected NAME=CHECKOUT:off|key, got {text!r}")
        return cls(name, Path(checkout).resolve(), mode == "key")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running(server: Server) -> Iterator[None]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"burst-{server.name}-"))
    if server.with_key:
        bench_api.save(data_dir / "keys.json", bench_api.KeysFile().with_entry(bench_api.TENANT))
    server.port = bench_api.free_port()
    log = open(data_dir / "api.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "server.supervisor.cli", "api", "--model", "tiny", "--device", "cpu",
         "--data-dir", str(data_dir), "--port", str(server.port), "--api-processes", "1"],
        cwd=server.checkout, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    server.pid = process.pid
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2)
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server.name} did not start; see {log.name}")
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def burst(server: Server, n: int) -> tuple[float, float]:
    bench_api.HEADERS.clear()
    if server.with_key:
        bench_api.HEADERS["Authorization"] = f"Key {bench_api.TENANT_TOKEN}"
    results = asyncio.run(bench_api.fire_burst(server.port, n))
    refused = [status for status, _ in results if status != 200]
    if refused:
        raise RuntimeError(f"{server.name}: {len(refused)} of {n} submits refused ({set(refused)})")
    latencies = [ms for _, ms in results]
    return bench_api.percentile(latencies, 50), bench_api.percentile(latencies, 99)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", type=Server.parse, action="append", required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    servers: list[Server] = args.server
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(running(server))
        for server in servers:
            burst(server, WARM_BURST)
        for round_number in range(args.rounds):
            for server in servers if round_number % 2 == 0 else servers[::-1]:
                before = cpu_seconds(server.pid)
                p50, p99 = burst(server, args.burst)
                time.sleep(0.5)  # the last responses' follow-up work (logs) is the burst's too
                server.rounds.append((p50, p99, cpu_seconds(server.pid) - before))
                print(f"round {round_number + 1} {server.name}: p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
                      f"API CPU {server.rounds[-1][2]:.2f} s", flush=True)  # fmt: skip
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "burst": args.burst,
        "servers": {
            server.name: {
                "checkout": str(server.checkout),
                "key": server.with_key,
                "p50_ms_median": statistics.median(r[0] for r in server.rounds),
                "p99_ms_median": statistics.median(r[1] for r in server.rounds),
                "api_cpu_s_median": statistics.median(r[2] for r in server.rounds),
                "rounds": server.rounds,
            }
            for server in servers
        },
    }
    for name, figures in report["servers"].items():
        print(f"{name}: p50 {figures['p50_ms_median']:.0f} ms, p99 {figures['p99_ms_median']:.0f} ms, "
              f"API CPU {figures['api_cpu_s_median']:.2f} s (medians of {args.rounds} rounds)")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
