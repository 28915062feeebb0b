"""The whole GPU check of flux-server at full size, from a bare device machine, in two commands:

    scripts/gpu_proof.sh bench    # (a) scripts/bench_gpu.py: presets vs bf16 eager, memory plans
    scripts/gpu_proof.sh serve    # (b) flux-server serve --model synthetic + the real fal_client

Each part stays under 6 minutes on one H100/H200 and writes its JSON (bench.json, serve.json)
and a markdown table (proof.md, both parts found so far) under $OUT (or --out).

(b) measures: time from start to /health ready (compile warm-up included), cold and again
with the compile cache kept; one 1024x1024 request end to end through fal_client.run against
the worker's own timing of the pipeline call (what the server adds); eight requests
submitted at once through fal_client.submit (images per minute, and the device's idle gap
between jobs from the worker's `device_idle_before` timing); and which preset ran, with the
server's note, for each `acceleration`.

`--cpu-smoke` runs the same code on the CPU with a small synthetic model (full widths, one
block of each kind) at 64x64, so that a first GPU run does not die on a typo.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_report import proof_table  # noqa: E402

APP = "fal-ai/flux/dev"
PROMPT = "a photo of an astronaut riding a horse on the moon"
SMOKE_MODEL = "synthetic:layers=1,single_layers=1,t5_layers=1,clip_layers=1,siglip_layers=1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------- (a) bench


class ProofError(RuntimeError):
    """A step of the check failed: recorded in the report, the steps that can still run do."""


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """scripts/bench_gpu.py, which writes bench.json after every row. A run that dies inside a
    row (a sticky CUDA error, say) is run again with --resume: that row is recorded as failed
    and the rows after it still run, until the part's time is spent."""
    out = args.out / "bench.json"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(REPO / "scripts" / "bench_gpu.py"), f"--out={out}"]
    data_dir = args.data_dir / "bench"  # apart from the server's: its cold start stays cold
    command += [f"--model={args.model}", f"--device={args.device}", f"--data-dir={data_dir}"]
    command += [f"--width={args.size}", f"--height={args.size}", f"--steps={args.steps}"]
    command += [f"--runs={args.runs}", f"--memory-plans={args.memory_plans}"]
    command += [f"--plan-steps={args.plan_steps}"]
    if args.cpu_smoke:  # the smoke checks the proof; the tuning rows' CPU test is test_bench_gpu.py's
        command += ["--tuning="]
    command += [f"--compile-backend={args.compile_backend}", f"--budget-s={args.bench_budget_s}"]
    # One deadline for every run of the script: a resumed run starts no row after it.
    command += [f"--deadline={time.time() + args.bench_budget_s}"]
    started = time.perf_counter()
    errors: list[str] = []
    with open(args.out / "bench.log", "ab") as log:
        for attempt in range(args.bench_attempts):
            left = args.bench_timeout_s - (time.perf_counter() - started)
            if left < 10:
                errors.append(f"no time left to resume after attempt {attempt}")
                break
            try:
                done = subprocess.run(
                    command + (["--resume"] if attempt else []),
                    cwd=REPO,
                    timeout=left,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            except subprocess.TimeoutExpired:
                errors.append(f"bench_gpu.py was stopped at the part's limit of {args.bench_timeout_s:.0f} s")
                break
            if done.returncode == 0:
                break
            errors.append(f"bench_gpu.py exited with code {done.returncode} (see bench.log)")
            report = json.loads(out.read_text()) if out.exists() else {}
            if "running" not in report:
                break  # it died outside a row (building the model...): a rerun would too
    report = json.loads(out.read_text()) if out.exists() else {}
    if died_in := report.pop("running", None):
        section, name = died_in
        key = "mode" if section == "rows" else "plan"
        why = errors[-1] if errors else "the process ended"
        report.setdefault(section, []).append({key: name, "error": f"stopped inside this row: {why}"})
    report["wall_s"] = time.perf_counter() - started
    if errors:
        report["error"] = "; ".join(errors)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


# ------------------------------------------------------------------------------- (b) serve


class Server:
    """One `flux-server serve` child on a free loopback port, over TLS (fal_client is https only)."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, certs: Any, log_path: Path) -> None:
        self.args, self.data_dir, self.certs, self.log_path = args, data_dir, certs, log_path
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float) -> float:
        """Start and wait for /health 200; seconds from the start to ready."""
        import httpx

        command = [sys.executable, "-m", "server.supervisor.cli", "serve", "--model", self.args.model]
        command += ["--data-dir", str(self.data_dir), "--port", str(self.port), "--workers", "1"]
        command += ["--device", self.args.device, "--ssl-certfile", str(self.certs.cert)]
        command += ["--ssl-keyfile", str(self.certs.key)]
        # Only the server's own settings and its data dir's compile cache count.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("FLUX_") and k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
        }
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = started + timeout
        with httpx.Client(verify=str(self.certs.ca), timeout=5.0) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise ProofError(f"serve exited with {self.process.returncode}; see serve.log")
                try:
                    health = client.get(f"{self.url}/health")
                    # "ok": every worker ready ("degraded" is ready with some still loading).
                    if health.status_code == 200 and health.json()["status"] == "ok":
                        return time.perf_counter() - started
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise ProofError(f"serve not ready after {timeout:.0f} s; see serve.log")

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/health", verify=str(self.certs.ca), timeout=5.0).json()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def fal_module(server: Server) -> Any:
    """fal_client configured the way a user does it: by the environment, before the import."""
    hostport = f"127.0.0.1:{server.port}"
    os.environ.update(
        {
            "FAL_QUEUE_RUN_HOST": hostport,
            "FAL_RUN_HOST": f"{hostport}/run",
            "SSL_CERT_FILE": str(server.certs.bundle),
            "FAL_KEY": "unused-no-auth-on-loopback",
        }
    )
    import fal_client

    return fal_client


def arguments(args: argparse.Namespace, seed: int, acceleration: str) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "image_size": {"width": args.size, "height": args.size},
        "num_inference_steps": args.steps,
        "seed": seed,
        "acceleration": acceleration,
    }


def one_request(fal: Any, args: argparse.Namespace) -> dict[str, Any]:
    """fal_client.run (fal's sync /run: no polling in the figure) against the worker's timing."""
    fal.run(APP, arguments(args, 0, args.acceleration))  # not timed: first use of the size
    rows = []
    for seed in range(1, args.single_runs + 1):
        started = time.perf_counter()
        result = fal.run(APP, arguments(args, seed, args.acceleration))
        total = time.perf_counter() - started
        inference = result["timings"]["inference"]
        rows.append({"end_to_end_s": total, "inference_s": inference, "server_adds_s": total - inference})
    return {
        "acceleration": args.acceleration,
        "runs": rows,
        "median_end_to_end_s": statistics.median(r["end_to_end_s"] for r in rows),
        "median_inference_s": statistics.median(r["inference_s"] for r in rows),
        "median_server_adds_ms": 1000 * statistics.median(r["server_adds_s"] for r in rows),
    }


def burst(fal: Any, args: argparse.Namespace) -> dict[str, Any]:
    """`args.burst` requests submitted at once; FIFO, so the first one follows an idle device."""
    started = time.perf_counter()
    handles = [fal.submit(APP, arguments(args, 100 + i, args.acceleration)) for i in range(args.burst)]
    submitted = time.perf_counter() - started
    results = [handle.get(interval=0.02) for handle in handles]
    seconds = time.perf_counter() - started
    gaps = [r["timings"].get("device_idle_before") for r in results[1:]]
    known = [g for g in gaps if g is not None]
    return {
        "requests": args.burst,
        "submit_s": submitted,
        "all_done_s": seconds,
        "images_per_minute": 60 * args.burst / seconds,
        "inference_s": [r["timings"]["inference"] for r in results],
        "idle_gaps_ms": [None if g is None else 1000 * g for g in gaps],
        "max_idle_gap_ms": 1000 * max(known) if known else None,
        "median_idle_gap_ms": 1000 * statistics.median(known) if known else None,
    }


def presets_reported(fal: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for acceleration in ("none", "regular", "high"):
        result = fal.run(APP, arguments(args, 7, acceleration))
        rows.append(
            {
                "requested": acceleration,
                "ran": result.get("acceleration"),
                "note": result.get("acceleration_note"),
                "inference_s": result["timings"]["inference"],
                "images": len(result["images"]),
            }
        )
    return rows


def run_serve(args: argparse.Namespace) -> dict[str, Any]:
    """Each step is timed and saved as soon as it is done; a step that fails or that the time
    left cannot hold is recorded as such, never silently dropped."""
    from models.tiny import ensure_tiny
    from server.tls import make_certificates

    data_dir = args.data_dir / "serve"
    ensure_tiny(data_dir)  # built before the clock starts: the ready times are load + warm-up
    certs = make_certificates(args.data_dir / "certs", hosts=[])
    server = Server(args, data_dir, certs, args.out / "serve.log")
    report: dict[str, Any] = {"model": args.model, "device": args.device, "size": f"{args.size}x{args.size}"}
    report.update(steps=args.steps, errors={}, skipped=[])
    deadline = time.perf_counter() + args.serve_budget_s
    path = args.out / "serve.json"

    def step(name: str, needs_s: float, action: Any) -> bool:
        if deadline - time.perf_counter() < needs_s:
            report["skipped"].append(f"{name}: less than {needs_s:.0f} s of the part's budget left")
        else:
            try:
                report[name] = action()
            except Exception as exc:  # recorded: the report says what failed and why
                report["errors"][name] = f"{type(exc).__name__}: {exc}"
        path.write_text(json.dumps(report, indent=2) + "\n")
        return name in report

    def ready_timeout() -> float:
        return max(1.0, min(args.ready_timeout_s, deadline - time.perf_counter() - 5))

    try:
        if step("ready_cold_s", 30, lambda: server.start(ready_timeout())):
            step("health", 0, server.health)
            fal = fal_module(server)
            report["fal_client"] = getattr(fal, "__version__", None)
            step("single", args.single_needs_s, lambda: one_request(fal, args))
            step("burst", args.burst_needs_s, lambda: burst(fal, args))
            step("presets", args.presets_needs_s, lambda: presets_reported(fal, args))
            server.stop()
            # Last, so a slow restart cannot crowd out the requests: the same data dir, the
            # compile cache kept.
            step("ready_warm_s", args.warm_needs_s, lambda: server.start(ready_timeout()))
    finally:
        server.stop()
    return report


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["bench", "serve", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-proof")))
    parser.add_argument(
        "--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "flux-proof", help="models, caches"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU, small synthetic model, 64x64")
    parser.add_argument("--acceleration", default="regular", help="preset of the timed requests")
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    args.model = SMOKE_MODEL if smoke else "synthetic"
    args.device = "cpu" if smoke else "cuda"
    args.size, args.steps = (64, 2) if smoke else (1024, 28)
    args.runs, args.single_runs, args.burst = (1, 1, 3) if smoke else (3, 3, 8)
    args.memory_plans = "fp8-offload-text" if smoke else "all"
    args.plan_steps = 1 if smoke else 2
    args.compile_backend = "eager" if smoke else "inductor"
    # Part (a) must end within its 6 minutes: the rows not started after this are skipped.
    args.bench_budget_s, args.bench_timeout_s = (600.0, 900.0) if smoke else (240.0, 310.0)
    args.bench_attempts = 10  # the first run, then a resume after each row that kills the process
    # Part (b) ends within its 6 minutes too: a step is skipped (and reported) when the time
    # left cannot hold it.
    args.serve_budget_s = 3600.0 if smoke else 320.0
    args.ready_timeout_s = 600.0 if smoke else 230.0
    args.single_needs_s, args.burst_needs_s, args.presets_needs_s, args.warm_needs_s = (
        (0.0, 0.0, 0.0, 0.0) if smoke else (25.0, 35.0, 20.0, 45.0)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_dir = args.data_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part in ("bench", "all"):
        run_bench(args)  # bench.json
    if args.part in ("serve", "all"):
        run_serve(args)  # serve.json
    found = {name: args.out / f"{name}.json" for name in ("bench", "serve")}
    reports = {name: json.loads(path.read_text()) for name, path in found.items() if path.exists()}
    table = proof_table(reports)
    if args.cpu_smoke:
        table = (
            "**CPU smoke run** (small synthetic model, 64x64): it proves the check runs end to end; "
            "its figures say nothing about the GPU targets.\n\n" + table
        )
    (args.out / "proof.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
