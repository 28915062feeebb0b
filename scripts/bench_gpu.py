"""Benchmark the acceleration presets against plain diffusers, in one run on one machine.

GPU (the real measurement; no weights needed):

    python scripts/bench_gpu.py --out bench.json --memory-plans all

builds `--model synthetic` (the full-size FLUX.1 [dev] architecture with random bf16 weights
made directly on the GPU, by the server's own models/weights/synthetic.py), then times the
plain diffusers FluxPipeline (bf16 eager: the baseline) and each preset at 1024x1024, 28
steps: median seconds per image after warm-up, warm-up (compile) time, peak memory, ratio to
the baseline, ratio to the compute floor (FLOPs / measured bf16 matmul rate) and the relative
error of the final latents against the baseline, and what torch.compile did (graphs, graph
breaks). `--memory-plans` then measures each memory plan's peak on a fresh pipeline
(`--plan-steps` steps each).

The report (`--out`) is written after every row, most important first (the baseline,
`regular`, `high`, `none`, then the plans, then the tuning pieces); a row that fails is recorded
with its error and the next one runs; after a crash, `--resume` keeps what was measured
(scripts/bench_rows.py).

Tuning pieces (`--tuning`; models/presets/policy.py's TUNING): flux-fast's pieces beyond
`regular`, each off in the shipped presets until this measurement shows it helps. Each row is
`regular` plus the pieces named (`a+b` combines), on a fresh pipeline after the memory plans,
with `vs_regular` beside it; a piece the machine cannot run falls back and its row says so
(`tuning_ran` lists what ran).

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
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_rows import BenchReport  # noqa: E402
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
    `device` in bf16 (fp32 on a CPU without bf16 matmuls) by the server's own code
    (models/weights/synthetic.py)."""
    from diffusers import FluxPipeline

    from models.loading import compute_dtype
    from models.tiny import ensure_tiny
    from models.weights.synthetic import build_components, parse_synthetic

    tiny_dir = ensure_tiny(Path(args.data_dir))
    if args.model == "tiny":
        pipe = FluxPipeline.from_pretrained(tiny_dir)
    else:
        dtype = compute_dtype(device, synthetic=True)  # bf16, or fp32 on a CPU without bf16 matmuls
        spec = parse_synthetic(args.model)
        parts = build_components(spec, tiny_dir, device=device, dtype=dtype, redux=False)
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


def dynamo_counts() -> dict[str, Any]:
    """What torch.compile did since the counters were last cleared: graphs compiled, frames
    compiled (first compiles and recompiles), graph breaks and their most common reasons.
    The proof also logs each graph break and recompile with its reason (TORCH_LOGS)."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "frames_compiled": counters["frames"]["ok"],
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": dict(breaks.most_common(3)),
    }


def clear_dynamo_counts() -> None:
    from torch._dynamo.utils import counters

    counters.clear()


BASELINE = "diffusers eager (baseline)"


class PresetBench:
    """The baseline and each preset on one pipeline, one row each, most important first; each
    preset gets a PresetManager of its own, so that one preset's failure (fp8, compile, out of
    memory) costs only its row, and its memory is given back before the next one."""

    def __init__(self, args: argparse.Namespace, device: str, report: BenchReport) -> None:
        from models.memory import apply_plan, choose_plan, vram_bytes

        self.args, self.device, self.report = args, device, report
        started = time.perf_counter()
        self.pipe = build_pipeline(args, device)
        build_s = time.perf_counter() - started
        self.plan = choose_plan(vram_bytes(device), forced=args.memory_plan)
        apply_plan(self.pipe, self.plan, device)
        if "floor_s" not in report.data:  # the tuning rows' pipeline keeps the presets' figures
            rate = matmul_rate(device, self.pipe.transformer.dtype)
            flops = flops_per_image(self.pipe.transformer.config, args.width, args.height, args.steps)
            config = self.pipe.transformer.config
            report.data.update(
                transformer_blocks=[config.num_layers, config.num_single_layers],
                memory_plan=self.plan.name,
                build_s=build_s,
                matmul_tflops=rate / 1e12,
                floor_s=flops / rate,
                flops_per_image=flops,
            )
            report.save()
        self.floor = report.data["floor_s"]
        self.calls = count_block_work(self.pipe.transformer) if args.count_blocks else None
        # The baseline's final latents, for every later row's error (kept across --resume).
        self.baseline_file = Path(args.data_dir) / "bench-baseline-latents.pt"
        if not report.done("rows", BASELINE):
            self.baseline_file.unlink(missing_ok=True)  # another run's: never compared against

    def run(self) -> None:
        self.report.measure("rows", BASELINE, self.baseline)
        for name in self.args.presets:
            self.row(f"preset {name}", lambda name=name: self.preset(name))

    def run_tuning(self) -> None:
        for pieces in self.args.tuning:
            self.row(tuning_mode(pieces), lambda pieces=pieces: self.tuned(pieces))

    def row(self, mode: str, measure: Any) -> None:
        if time.time() > self.args.deadline:
            self.report.skip("rows", mode, "the bench's time budget was spent")
            return
        self.report.measure("rows", mode, measure)
        release(self.device)

    def baseline(self) -> dict[str, Any]:
        """The plain pipeline, nothing of ours involved."""
        import torch

        clear_dynamo_counts()
        start = time.perf_counter()
        one = argparse.Namespace(**{**vars(self.args), "runs": 1})
        time_mode(self.pipe, one, self.device, contextlib.nullcontext, self.calls)
        warm = time.perf_counter() - start
        result = time_mode(self.pipe, self.args, self.device, contextlib.nullcontext, self.calls)
        torch.save(result["latents"], self.baseline_file)
        return {"warmup_s": warm, **self.finish(result), **dynamo_counts()}

    def tuned(self, pieces: list[str]) -> dict[str, Any]:
        """`regular` with tuning pieces on, beside `regular` as measured in this report."""
        from models.presets.policy import with_tuning

        presets = fixed_schedule_presets()
        tuned = {**presets, "regular": with_tuning(presets["regular"], pieces)}
        row = self.preset("regular", tuned, tuning=True)
        regular = self.report.find("rows", "preset regular") or {}
        if "seconds" in row:
            row["vs_regular"] = row["seconds"] / regular["seconds"] if regular.get("seconds") else None
        return row

    def preset(
        self, name: str, presets: dict[str, Any] | None = None, *, tuning: bool = False
    ) -> dict[str, Any]:
        """One preset's row. `tuning`: a tuning row, not timed when none of its pieces can run
        here (it would time plain `regular` again); the row says why instead."""
        from models.presets.apply import PresetManager

        clear_dynamo_counts()
        manager = PresetManager(
            self.pipe.transformer,
            device=self.device,
            enabled=[name],
            data_dir=Path(self.args.data_dir),
            presets=presets or fixed_schedule_presets(),
            memory_plan=self.plan,
            compile_backend=self.args.compile_backend,
        )
        # The manager (its weight sets, its compiled graphs) is dropped with this frame.
        runnable, note = manager.runnable[name]
        if tuning and not runnable.tuning:
            return {"skipped": f"none of its pieces can run here: {note}", "tuning_ran": []}
        size = [(self.args.width, self.args.height)]
        warm = manager.warmup(self.pipe, size, steps=2, names=[name])[name]
        result = time_mode(
            self.pipe,
            self.args,
            self.device,
            lambda: manager.use(self.pipe, name, steps=self.args.steps),
            self.calls,
        )
        return {"warmup_s": warm, **self.finish(result), **dynamo_counts()}

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """A timed mode's row: what ran, and how it compares with the baseline and the floor."""
        import torch

        latents = result.pop("latents")
        active = result.pop("active")
        preset = active.preset if active is not None else None
        plain = f"plain FluxPipeline, {str(self.pipe.transformer.dtype).removeprefix('torch.')}"
        row = {**result, "ran": preset.describe() if preset is not None else plain}
        row["tuning_ran"] = preset.tuning if preset is not None else []
        row["note"] = active.note if active is not None else None
        if preset is not None and preset.cache is not None:
            row["note"] = (row["note"] + "; " if row["note"] else "") + (
                "fixed skip schedule (MagCache, FLUX.1 [dev] ratios); vs floor counts every step"
            )
        base = self.report.find("rows", BASELINE) or {}
        base_latents = torch.load(self.baseline_file) if self.baseline_file.exists() else None
        row["rel_error"] = (
            float((latents - base_latents).norm() / base_latents.norm()) if base_latents is not None else None
        )
        base_seconds = base.get("seconds", row["seconds"] if active is None else None)
        row["vs_baseline"] = row["seconds"] / base_seconds if base_seconds else None
        row["vs_floor"] = row["seconds"] / self.floor
        return row


def measure_plans(args: argparse.Namespace, device: str, report: BenchReport) -> None:
    """Each memory plan's peak: a fresh pipeline made on the device, placed by the plan, one
    plain (preset `none`) generation of `--plan-steps` steps at the benchmark's size; one row
    each, so that a plan that fails (or has never run anywhere) costs only its row."""
    import torch

    from models.memory import PLANS, apply_plan

    plan_args = argparse.Namespace(**{**vars(args), "runs": 1, "steps": args.plan_steps})

    def measure(name: str) -> dict[str, Any]:
        pipe = build_pipeline(args, device)
        try:
            apply_plan(pipe, PLANS[name], device)
            release(device)
            resident = torch.cuda.memory_allocated() / 1024**3 if device == "cuda" else None
            result = time_mode(pipe, plan_args, device, contextlib.nullcontext, None)
            return {
                "steps": args.plan_steps,
                "seconds": result["seconds"],
                "resident_gib": resident,
                "peak_gib": result["peak_gib"],
                "expected_peak_gib": PLANS[name].expected_peak_gib,
            }
        finally:
            del pipe

    for name in args.memory_plans:
        if time.time() > args.deadline:
            report.skip("memory_plans", name, f"time budget of {args.budget_s:.0f} s spent")
            continue
        report.measure("memory_plans", name, lambda name=name: measure(name))
        release(device)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every row in order of importance, the report written after each (bench_rows.py)."""
    import diffusers
    import torch

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny or --device cpu on a CPU")
    header = {
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
            **{name: installed_version(name) for name in ("transformers", "torchao", "peft", "triton")},
        },
        "model": args.model,
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
        "runs": args.runs,
        "compile_backend": args.compile_backend,
    }
    report = BenchReport(args.out, header, resume=args.resume)
    modes = [BASELINE, *(f"preset {name}" for name in args.presets)]
    if not all(report.done("rows", mode) for mode in modes):  # a resumed run may have them all
        PresetBench(args, device, report).run()
    release(device)  # the presets' pipeline is gone: each memory plan builds its own
    measure_plans(args, device, report)
    release(device)
    # Last: each piece is worth a few percent at most, the rows above are the targets.
    tuning = [tuning_mode(pieces) for pieces in args.tuning]
    if time.time() > args.deadline:  # no pipeline is built for rows that cannot start
        for mode in tuning:
            report.skip("rows", mode, "the bench's time budget was spent")
    elif not all(report.done("rows", mode) for mode in tuning):
        PresetBench(args, device, report).run_tuning()
    report.save()
    return report.data


def tuning_mode(pieces: list[str]) -> str:
    """A tuning row's name: "regular + CUDA graphs", "regular + inductor flags + compiled VAE decode"."""
    from models.presets.policy import TUNING

    return " + ".join(["regular", *(TUNING[piece].label for piece in pieces)])


def installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


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
        "--budget-s", type=float, default=float("inf"), help="skip the rows left after this long"
    )
    parser.add_argument(
        "--deadline", type=float, default=None, help="skip the rows left after this time.time() (wins)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows --out already holds and measure the rest (after a crash; see bench_rows.py)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument("--presets", default="regular,high,none", help="in this order (most important first)")
    parser.add_argument(
        "--tuning",
        default=None,
        help="tuning rows on top of regular, comma-separated, a+b to combine pieces (default: each piece "
        "alone; '' for none)",
    )
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
    from models.presets.policy import TUNING

    rows = list(TUNING) if args.tuning is None else [row for row in args.tuning.split(",") if row]
    args.tuning = [row.split("+") for row in rows]
    unknown = sorted({piece for pieces in args.tuning for piece in pieces} - set(TUNING))
    if unknown:
        parser.error(f"unknown tuning piece(s) {', '.join(unknown)}; choose from {', '.join(TUNING)}")
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
    if args.deadline is None:
        args.deadline = time.time() + args.budget_s
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)  # writes --out as it goes
    print(bench_table(report))


if __name__ == "__main__":
    main()
