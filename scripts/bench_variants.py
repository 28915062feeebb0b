#!/usr/bin/env python
"""Variant benchmark (not a test): what switching checkpoints costs, and what affinity saves.

With the real runtime, residency manager and workers (models/residency.py, server/worker):

1. swap time: a GPU budget that holds one transformer, two variants used in turns; each use
   moves one onto the device. From pinned host memory (the variants' home when host memory
   allows) and from disk (their home is a spill file when it does not). Medians.
2. mixed stream: `--jobs` requests over two variants (a fixed random mix), on two workers of
   one SQLite queue whose budgets hold one transformer each; with the variant affinity of the
   claims (server/worker/variants.py) and without it (the claim takes the head). Wall time
   from the workers' start to the last result, jobs per second, and swaps.

On a CPU the device is the host: a swap from "host" moves nothing (its figure is the
bookkeeping), a swap from "disk" really frees and re-reads the weights. On a GPU both are real
copies; use `--model synthetic` there (full-size random variants).

    .venv/bin/python scripts/bench_variants.py [--model tiny] [--device cpu] [--size 64]
        [--steps 2] [--repeats 6] [--jobs 24] [--home disk] [--out r.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("dev", "krea")


def transformer_bytes(runtime: Any) -> int:
    return sum(t.numel() * t.element_size() for t in runtime.pipe.transformer.parameters())


def model_transformer_bytes(model: str, data_dir: Path) -> int:
    """One transformer's bytes as loaded (fp32 tiny on a CPU, bf16 synthetic), without loading a runtime."""
    if model == "tiny":
        from diffusers import FluxTransformer2DModel

        from models.tiny import ensure_tiny

        transformer = FluxTransformer2DModel.from_pretrained(ensure_tiny(data_dir) / "transformer")
        return sum(t.numel() * t.element_size() for t in transformer.parameters())
    from models.weights.synthetic import parameter_count
    from models.weights.synthetic_spec import parse_synthetic

    return parameter_count(parse_synthetic(model)) * 2


def load(args: argparse.Namespace, data_dir: Path, *, home: str) -> Any:
    """A runtime serving the base and Krea, with a GPU budget for one transformer."""
    from models.loading import load_runtime
    from models.variants.serving import VariantOptions

    size = model_transformer_bytes(args.model, data_dir)
    options = VariantOptions(
        configured={"krea": "tiny" if args.model == "tiny" else "synthetic"},
        gpu_budget_bytes=size + size // 2,
        host_budget_bytes=0 if home == "disk" else None,
        spill_dir=data_dir / "variant-spill" / f"bench-{home}-{time.monotonic_ns()}",
    )
    return load_runtime(
        args.model, data_dir=data_dir, device=args.device, presets=("none",), variants=options
    )


def swap_times(runtime: Any, repeats: int) -> dict[str, Any]:
    residency = runtime.residency
    seconds = []
    for i in range(repeats * 2):
        with residency.use(VARIANTS[(i + 1) % 2]) as swap:
            assert swap is not None
            seconds.append(swap.seconds)
    return {
        "source": swap.source,
        "median_ms": round(statistics.median(seconds) * 1000, 2),
        "min_ms": round(min(seconds) * 1000, 2),
        "transformer_mb": round(transformer_bytes(runtime) / 1024**2, 2),
        "swaps": len(seconds),
    }


def mixed_stream(
    args: argparse.Namespace, runtimes: list[Any], data_dir: Path, *, affinity: bool
) -> dict[str, Any]:
    from server.config import Settings
    from server.jobs import Job, Status
    from server.queue.factory import open_queue
    from server.worker import Worker, variants

    root = Path(tempfile.mkdtemp(prefix="stream-", dir=data_dir))
    settings = Settings(model=args.model, data_dir=root, device=args.device, variants={"krea": "tiny"})
    api = open_queue(settings, role="api")
    mix = random.Random(7)
    ids = []
    for i in range(args.jobs):
        job = Job(
            prompt="a lighthouse", width=args.size, height=args.size, num_inference_steps=args.steps,
            seed=i, variant=mix.choice(VARIANTS), output_format="png",
        )  # fmt: skip
        ids.append(api.submit(job).id)
    original = variants.WorkerVariants.preference
    if not affinity:
        variants.WorkerVariants.preference = lambda self, runtime, loras: loras  # type: ignore[method-assign]
    swaps_before = sum(rt.residency.stats.swaps for rt in runtimes)
    workers = []
    for index, runtime in enumerate(runtimes):
        worker = Worker(settings, worker_id=f"bench-w{index}", exit_process=lambda code: None)
        worker._load = lambda runtime=runtime: runtime  # type: ignore[method-assign]
        workers.append(worker)
    started = time.perf_counter()
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    try:
        for thread in threads:
            thread.start()
        records = []
        for request_id in ids:  # each one finished (the queue's own record)
            while (record := api.get(request_id)) is None or record.status is not Status.COMPLETED:
                time.sleep(0.02)
            records.append(record)
        elapsed = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(60)
        variants.WorkerVariants.preference = original  # type: ignore[method-assign]
        api.close()
    failed = [r.error.message for r in records if r.error is not None]
    if failed:
        raise SystemExit(f"{len(failed)} job(s) failed: {failed[0]}")
    swaps = sum(rt.residency.stats.swaps for rt in runtimes) - swaps_before
    return {
        "affinity": affinity,
        "jobs": args.jobs,
        "seconds": round(elapsed, 2),
        "jobs_per_second": round(args.jobs / elapsed, 2),
        "swaps": swaps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny, or synthetic[:...] on a GPU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="holds the tiny model (default: a temp dir)"
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--home", default="disk", choices=["host", "disk"], help="the stream's variant homes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import diffusers
    import torch

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-variants-"))
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0)
        if args.device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "command": " ".join(["scripts/bench_variants.py", *sys.argv[1:]]),
        "swap": {},
    }
    for home in ("host", "disk"):
        report["swap"][home] = swap_times(load(args, data_dir, home=home), args.repeats)
    runtimes = [load(args, data_dir, home=args.home) for _ in range(2)]
    report["stream"] = [mixed_stream(args, runtimes, data_dir, affinity=a) for a in (False, True)]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
