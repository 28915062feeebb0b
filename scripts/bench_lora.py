#!/usr/bin/env python
"""LoRA benchmark (not a test): what a per-request LoRA costs on the tiny model on this machine.

Measures, with the real runtime and LoRA manager (models/lora):

1. first load: a LoRA never seen before (read and checked from disk, then loaded as an adapter
   or hot-swapped into a slot), the time `LoraManager.apply` takes before generating;
2. cached switch: switching to another LoRA already held in memory;
3. per-image overhead: a whole request with one cached LoRA against the same request without
   (fastest of the repeats each, alternating: on a shared machine others only add time).

first load and cached switch are medians.

for both ways of holding LoRAs: named adapters (eager presets) and hot-swap slots (compiled
presets; here compiled with dynamo's "eager" backend, which keeps the graph plumbing and the
guards but no inductor kernels, so the swap cost is measured without minutes of compiling).

    .venv/bin/python scripts/bench_lora.py [--size 256] [--steps 4] [--rank 16] [--repeats 5] [--out r.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def measure(runtime: Any, files: list[Path], args: argparse.Namespace) -> dict[str, float]:
    from models.lora.spec import LoraSpec
    from models.request import GenerationRequest

    def request(*loras: LoraSpec) -> GenerationRequest:
        return GenerationRequest(
            prompt="a lighthouse", width=args.size, height=args.size, seed=1, steps=args.steps, loras=loras
        )

    def timed_apply(spec: LoraSpec) -> float:
        started = time.perf_counter()
        with runtime.loras.apply([spec]):
            elapsed = time.perf_counter() - started
        return elapsed

    specs = [LoraSpec(f.name, f) for f in files]
    runtime.generate(request())  # warm: first call costs extra everywhere
    first = [timed_apply(spec) for spec in specs]  # each read from disk once
    switch = [timed_apply(specs[i % len(specs)]) for i in range(args.repeats * len(specs))]

    runtime.generate(request(specs[1]))  # warm the LoRA path too (a graph of its own when compiled)
    plain, with_lora = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        runtime.generate(request())
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        runtime.generate(request(specs[1]))
        with_lora.append(time.perf_counter() - started)
    return {
        "first_load_ms": median_ms(first),
        "cached_switch_ms": median_ms(switch),
        # Fastest of the repeats: other processes on a shared machine only ever add time.
        "request_without_lora_ms": round(min(plain) * 1000, 2),
        "request_with_cached_lora_ms": round(min(with_lora) * 1000, 2),
        "per_image_overhead_ms": round((min(with_lora) - min(plain)) * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--loras", type=int, default=4, help="distinct LoRAs switched between")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import diffusers
    import peft
    import torch

    from models.loading import load_runtime
    from models.lora.manager import LoraManager
    from models.lora.spec import LoraLimits
    from models.lora.tiny_loras import write_lora
    from models.presets.apply import PresetManager
    from models.presets.policy import Hardware, Preset

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp)
        results: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "peft": peft.__version__,
            },
            "setup": {k: getattr(args, k) for k in ("size", "steps", "rank", "loras", "repeats")},
            "command": " ".join(["scripts/bench_lora.py", *sys.argv[1:]]),
        }
        limits = LoraLimits(max_rank=args.rank, max_loaded=args.loras)
        for mode in ("adapters", "hotswap"):
            runtime = load_runtime("tiny", data_dir=data_dir, device="cpu", presets=("none",))
            if mode == "hotswap":
                runtime.presets = PresetManager(
                    runtime.pipe.transformer,
                    device="cpu",
                    enabled=["none"],
                    data_dir=data_dir,
                    presets={"none": Preset("none", compile="regional")},
                    compile_backend="eager",
                    hardware=Hardware("cpu", None, torchao=False, compiler=True),
                )
            runtime.loras = LoraManager(
                runtime.pipe, limits=replace(limits, hotswap="eager"), compiled=mode == "hotswap"
            )
            runtime.loras.prepare()
            files = [
                write_lora(
                    Path(tmp) / f"{mode}-{i}.safetensors", runtime.pipe.transformer, seed=i, rank=args.rank
                )
                for i in range(args.loras)
            ]
            results[mode] = measure(runtime, files, args)
            print(mode, json.dumps(results[mode]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
