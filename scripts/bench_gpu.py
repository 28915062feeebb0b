"""Benchmark the acceleration presets against plain diffusers, in one run on one machine.

GPU (the real measurement; no weights needed):

    python scripts/bench_gpu.py --out bench.json --memory-plans all

builds `--model synthetic` (the full-size FLUX.1 [dev] architecture with random bf16 weights
made directly on the GPU, by the server's own models/weights/synthetic.py), then times the
plain diffusers FluxPipeline (bf16 eager: the baseline) and each preset at 1024x1024, 28
steps: median seconds per image after warm-up, warm-up (compile) time, peak memory, ratio to
the baseline, ratio to the compute floor (FLOPs / measured bf16 matmul rate) and the relative
error of the final latents against the baseline. `--memory-plans` then measures each memory
plan's peak on a fresh pipeline (`--plan-steps` steps each).

CPU (tests the script itself): `--tiny` uses the tiny model at 64x64, 4 steps;
`--device cpu --model synthetic:layers=1,...` runs the synthetic path at full width.

Step caching: First Block Cache (the shipped `high`) decides what to skip from activations,
which mean nothing with random weights. So `high` runs here with MagCache and FLUX.1 [dev]'s
published magnitude ratios instead: a skip schedule fixed by the step count alone, stated in
the report; everything else in `high` is as shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from gpu_report import bench_table  # noqa: E402

TEXT_TOKENS = 512  # FLUX pads T5 prompts to max_sequence_length


def flops_per_image(transformer_config: Any, width: int, height: int, steps: int) -> float:
    """Transformer FLOPs (linears + attention) for one image; 2.08e15 for 1024x1024 at 28 steps.

    Every block holds 12*H^2 weights per stream that multiply tokens (modulation weights see one
    vector and are left out): double blocks apply them to image and text tokens separately,
    single blocks to all tokens together."""
    hidden = transformer_config.num_attention_heads * transformer_config.attention_head_dim
    double, single = transformer_config.num_layers, transformer_config.num_single_layers
    image_tokens = (width // 16) * (height // 16)
    length = image_tokens + TEXT_TOKENS
    per_block = 12 * hidden**2
    linear = 2 * (per_block * double * (image_tokens + TEXT_TOKENS) + per_block * single * length)
    attention = (double + single) * 4 * length**2 * hidden
    return float(linear + attention) * steps


def matmul_rate(device: str, dtype: Any) -> float:
    """Measured dense matmul FLOP/s on this device (a large square product)."""
    import torch

    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    runs = 20 if device == "cuda" else 5
    start = time.perf_counter()
    for _ in range(runs):
        a @ b
    sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - start)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def build_pipeline(args: argparse.Namespace, device: str) -> Any:
    """The pipeline under test: the tiny model, or a synthetic FLUX.1 [dev] made directly on
    `device` in bf16 by the server's own code (models/weights/synthetic.py)."""
    import torch
    from diffusers import FluxPipeline

    from models.tiny import ensure_tiny
    from models.weights.synthetic import build_components, parse_synthetic

    tiny_dir = ensure_tiny(Path(args.data_dir))
    if args.model == "tiny":
        pipe = FluxPipeline.from_pretrained(tiny_dir)
    else:
        parts = build_components(
            parse_synthetic(args.model), tiny_dir, device=device, dtype=torch.bfloat16, redux=False
        )
        pipe = FluxPipeline(**parts.pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_block_work(transformer: Any) -> list[int]:
    """Counts block bodies that actually ran: a hook on a leaf inside each block (a hook on the
    block itself fires even when the step cache skips it). Registered before the presets copy
    and compile the transformer, so every weight set carries it; the hook breaks each compiled
    block's graph in two, so it is on only with --count-blocks (default in --tiny mode)."""
    import torch

    calls = [0]

    @torch.compiler.disable
    def count(*_: Any) -> None:
        calls[0] += 1

    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.attn.norm_q.register_forward_hook(count)
    return calls


def time_mode(
    pipe: Any, args: argparse.Namespace, device: str, run_ctx: Any, calls: list[int] | None
) -> dict[str, Any]:
    """Median seconds per image over args.runs, peak memory, final latents, block work done."""
    import torch

    final: dict[str, Any] = {}

    def keep_latents(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == args.steps - 1:
            final["latents"] = kwargs["latents"].float().cpu()
        return kwargs

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    block_calls = None
    for _ in range(args.runs):
        with run_ctx() as active:
            before = calls[0] if calls else 0
            sync(device)
            start = time.perf_counter()
            pipe(
                prompt="a photo of an astronaut riding a horse on the moon",
                width=args.width,
                height=args.height,
                num_inference_steps=args.steps,
                guidance_scale=3.5,
                generator=torch.Generator("cpu").manual_seed(0),
                callback_on_step_end=keep_latents,
            )
            sync(device)
            seconds.append(time.perf_counter() - start)
            block_calls = calls[0] - before if calls else None
    n_blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    return {
        "seconds": statistics.median(seconds),
        "all_seconds": [round(s, 4) for s in seconds],
        "peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else None,
        "latents": final["latents"],
        "block_work": None if block_calls is None else block_calls / (n_blocks * args.steps),
        "active": active,
    }


def fixed_schedule_presets() -> dict[str, Any]:
    """The presets as shipped, except that `high`'s step cache is MagCache with FLUX.1 [dev]'s
    published magnitude ratios: its skips follow the step schedule alone, so they are the same
    for random and real weights (First Block Cache's own decisions mean nothing on random
    weights). Every other part of `high` (fp8, compile, fused QKV) is as shipped."""
    from dataclasses import replace

    from models.presets.policy import PRESETS, CacheSetting

    return {**PRESETS, "high": replace(PRESETS["high"], cache=CacheSetting("mag", threshold=0.06))}


def release(device: str) -> None:
    import gc

    import torch

    torch._dynamo.reset()  # compiled graphs hold on to the modules they were traced from
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def measure_plans(
    args: argparse.Namespace, device: str, started: float, rows: list[dict[str, Any]], save: Any
) -> None:
    """Each memory plan's peak: a fresh pipeline made on the device, placed by the plan, one
    plain (preset `none`) generation of `--plan-steps` steps at the benchmark's size."""
    import torch

    from models.memory import PLANS, apply_plan

    plan_args = argparse.Namespace(**{**vars(args), "runs": 1, "steps": args.plan_steps})
    for name in args.memory_plans:
        if time.perf_counter() - started > args.budget_s:
            rows.append({"plan": name, "skipped": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        pipe = build_pipeline(args, device)
        apply_plan(pipe, PLANS[name], device)
        release(device)
        resident = torch.cuda.memory_allocated() / 1024**3 if device == "cuda" else None
        result = time_mode(pipe, plan_args, device, contextlib.nullcontext, None)
        rows.append(
            {
                "plan": name,
                "steps": args.plan_steps,
                "seconds": result["seconds"],
                "resident_gib": resident,
                "peak_gib": result["peak_gib"],
                "expected_peak_gib": PLANS[name].expected_peak_gib,
            }
        )
        del pipe, result
        release(device)
        save()  # a run cut short still leaves every plan measured so far


def measure_presets(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The baseline and every preset on one pipeline; what the report needs of it."""
    from models.memory import apply_plan, choose_plan, vram_bytes
    from models.presets.apply import PresetManager

    started = time.perf_counter()
    pipe = build_pipeline(args, device)
    build_s = time.perf_counter() - started
    plan = choose_plan(vram_bytes(device), forced=args.memory_plan)
    apply_plan(pipe, plan, device)
    rate = matmul_rate(device, pipe.transformer.dtype)
    flops = flops_per_image(pipe.transformer.config, args.width, args.height, args.steps)
    floor = flops / rate

    calls = count_block_work(pipe.transformer) if args.count_blocks else None
    rows: list[dict[str, Any]] = []
    # Baseline: the plain pipeline, nothing of ours involved.
    start = time.perf_counter()
    time_mode(pipe, argparse.Namespace(**{**vars(args), "runs": 1}), device, contextlib.nullcontext, calls)
    warm = time.perf_counter() - start
    base = time_mode(pipe, args, device, contextlib.nullcontext, calls)
    rows.append({"mode": "diffusers eager (baseline)", "warmup_s": warm, **base})

    manager = PresetManager(
        pipe.transformer,
        device=device,
        enabled=args.presets,
        data_dir=Path(args.data_dir),
        presets=fixed_schedule_presets(),
        memory_plan=plan,
        compile_backend=args.compile_backend,
    )
    warmups = manager.warmup(pipe, [(args.width, args.height)], steps=2)
    for name in args.presets:
        result = time_mode(
            pipe, args, device, lambda name=name: manager.use(pipe, name, steps=args.steps), calls
        )
        rows.append({"mode": f"preset {name}", "warmup_s": warmups[name], **result})

    base_latents = rows[0]["latents"]
    plain = f"plain FluxPipeline, {str(pipe.transformer.dtype).removeprefix('torch.')}"
    for row in rows:
        latents = row.pop("latents")
        active = row.pop("active")
        row["ran"] = active.preset.describe() if active is not None and active.preset else plain
        row["note"] = active.note if active is not None else None
        cache = active.preset.cache if active is not None and active.preset is not None else None
        row["rel_error"] = float((latents - base_latents).norm() / base_latents.norm())
        row["vs_baseline"] = row["seconds"] / rows[0]["seconds"]
        row["vs_floor"] = row["seconds"] / floor
        if cache is not None:
            row["note"] = (row["note"] + "; " if row["note"] else "") + (
                "fixed skip schedule (MagCache, FLUX.1 [dev] ratios); vs floor counts every step"
            )
    config = pipe.transformer.config
    return {
        "transformer_blocks": [config.num_layers, config.num_single_layers],
        "memory_plan": plan.name,
        "build_s": build_s,
        "matmul_tflops": rate / 1e12,
        "floor_s": floor,
        "flops_per_image": flops,
        "rows": rows,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    started = time.perf_counter()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny or --device cpu on a CPU")
    measured = measure_presets(args, device)
    release(device)  # the presets' pipeline is gone: each memory plan builds its own
    plans: list[dict[str, Any]] = []
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"CPU ({platform.processor() or 'cpu'})",
        "cpu_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
        },
        "model": args.model,
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
        "runs": args.runs,
        "compile_backend": args.compile_backend,
        **measured,
        "memory_plans": plans,
    }

    def save() -> None:
        report["total_s"] = time.perf_counter() - started
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    save()  # the presets' figures are kept even if the memory plans are cut short
    if args.memory_plans:
        measure_plans(args, device, started, plans, save)
    save()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny model, small size, few steps")
    parser.add_argument(
        "--model", default=None, help="synthetic (default), synthetic:layers=N,..., or tiny (with --tiny)"
    )
    parser.add_argument(
        "--device", default=None, choices=["cuda", "cpu"], help="default: cuda (cpu with --tiny)"
    )
    parser.add_argument(
        "--memory-plans", default="", help="comma-separated plans whose peaks to measure, or 'all' (GPU)"
    )
    parser.add_argument("--plan-steps", type=int, default=2, help="steps per memory-plan run")
    parser.add_argument(
        "--budget-s", type=float, default=float("inf"), help="skip the memory plans left after this long"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--presets", default="none,regular,high")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--runs", type=int, default=None, help="timed runs per mode (median)")
    parser.add_argument("--memory-plan", default="auto")
    parser.add_argument("--compile-backend", default="inductor", help="inductor, or eager to test plumbing")
    parser.add_argument(
        "--count-blocks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="count block bodies run (shows the step cache's skips; breaks graphs: default only in --tiny)",
    )
    parser.add_argument("--data-dir", default=str(REPO / ".flux-data"), help="tiny model and compile cache")
    args = parser.parse_args(argv)
    size, steps, runs = (64, 4, 2) if args.tiny else (1024, 28, 3)
    args.width = args.width or size
    args.height = args.height or size
    args.steps = args.steps or steps
    args.runs = args.runs or runs
    args.presets = [p for p in args.presets.split(",") if p]
    args.model = args.model or ("tiny" if args.tiny else "synthetic")
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    from models.memory import PLANS

    plans = list(PLANS) if args.memory_plans == "all" else [p for p in args.memory_plans.split(",") if p]
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        parser.error(f"unknown memory plan(s) {', '.join(unknown)}; choose from {', '.join(PLANS)}")
    args.memory_plans = plans
    if args.count_blocks is None:
        args.count_blocks = args.tiny
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)  # writes --out as it goes
    print(bench_table(report))


if __name__ == "__main__":
    main()
