"""Benchmark the acceleration presets against plain diffusers, in one run on one machine.

GPU (the real measurement; no weights needed, see shared/GPU.md):

    .venv/bin/python scripts/bench_gpu.py --out bench.json

builds the full-size FLUX.1 [dev] architecture with random bf16 weights directly on the GPU,
then times the plain diffusers FluxPipeline (bf16 eager: the baseline) and each preset at
1024x1024, 28 steps: median seconds per image after warm-up, warm-up (compile) time, peak
memory, ratio to the baseline, ratio to the compute floor (FLOPs / measured bf16 matmul rate)
and the relative error of the final latents against the baseline. `--memory-plan` applies
one memory plan first (run once per plan to measure each plan's peak).

CPU (tests the script itself): `--tiny` uses the tiny model at 64x64, 4 steps.

Step caching decides what to skip from activations, so with random weights its skip rate
means nothing: cached presets are timed, their skipped fraction of block work is shown, and
their ratios are reported as not measurable.
"""

from __future__ import annotations

import argparse
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

FULL_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FULL_T5 = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    num_layers=24,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
)
FULL_CLIP = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=768,
    hidden_act="quick_gelu",
)
FULL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TEXT_TOKENS = 512  # FLUX pads T5 prompts to max_sequence_length


def flops_per_image(transformer_config: Any, width: int, height: int, steps: int) -> float:
    """Transformer FLOPs (linears + attention) for one image; 2.08e15 for 1024x1024 at 28 steps.

    Every block holds 12*H^2 weights per stream that multiply tokens (modulation weights see one
    vector and are left out): double blocks apply them to image and text tokens separately,
    single blocks to all tokens together (shared/reference/performance-anchors.md section 6)."""
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


def build_full_pipeline(tiny_dir: Path) -> Any:
    """Full-size FLUX.1 [dev] with random bf16 weights, created directly on the GPU.

    Tokenizers come from the tiny model (only token ids matter; they are all below the full
    vocabulary sizes); the CLIP end-of-text id must match the tokenizer's, since pooling uses it."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer", model_max_length=77)
    tokenizer_2 = T5Tokenizer.from_pretrained(tiny_dir / "tokenizer_2")
    eos = tokenizer.eos_token_id
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            transformer = FluxTransformer2DModel(**FULL_TRANSFORMER)
            text_encoder_2 = T5EncoderModel(T5Config(**FULL_T5, pad_token_id=0, eos_token_id=1))
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    **FULL_CLIP, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=eos
                )
            )
            vae = AutoencoderKL(**FULL_VAE)
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir / "scheduler")
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
    )
    return pipe.to(dtype=torch.bfloat16)


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    import contextlib

    import diffusers
    import torch

    from models.memory import apply_plan, choose_plan, vram_bytes
    from models.presets.apply import PresetManager
    from models.tiny import ensure_tiny

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on a CPU, or on a machine with a GPU")
    data_dir = Path(args.data_dir)
    tiny_dir = ensure_tiny(data_dir)
    if args.tiny:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(tiny_dir)
    else:
        pipe = build_full_pipeline(tiny_dir)
    plan = choose_plan(vram_bytes(device), forced=args.memory_plan)
    apply_plan(pipe, plan, device)
    rate = matmul_rate(device, pipe.transformer.dtype)
    floor = flops_per_image(pipe.transformer.config, args.width, args.height, args.steps) / rate

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
        data_dir=data_dir,
        memory_plan=plan,
        compile_backend=args.compile_backend,
    )
    warmups = manager.warmup(pipe, [(args.width, args.height)], steps=2)
    for name in args.presets:
        result = time_mode(pipe, args, device, lambda name=name: manager.use(pipe, name), calls)
        rows.append({"mode": f"preset {name}", "warmup_s": warmups[name], **result})

    base_latents = rows[0]["latents"]
    for row in rows:
        latents = row.pop("latents")
        active = row.pop("active")
        plain = f"plain FluxPipeline, {str(pipe.transformer.dtype).removeprefix('torch.')}"
        row["ran"] = active.preset.describe() if active is not None and active.preset else plain
        row["note"] = active.note if active is not None else None
        cached = active is not None and active.preset is not None and active.preset.cache is not None
        row["rel_error"] = float((latents - base_latents).norm() / base_latents.norm())
        row["vs_baseline"] = None if cached else row["seconds"] / rows[0]["seconds"]
        row["vs_floor"] = None if cached else row["seconds"] / floor
        if cached:
            row["note"] = (row["note"] + "; " if row["note"] else "") + (
                "step cache with random weights: skip rate not meaningful, ratios not measurable"
            )
    return {
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
        },
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
        "runs": args.runs,
        "memory_plan": plan.name,
        "compile_backend": args.compile_backend,
        "matmul_tflops": rate / 1e12,
        "floor_s": floor,
        "flops_per_image": flops_per_image(pipe.transformer.config, args.width, args.height, args.steps),
        "rows": rows,
    }


def markdown_table(report: dict[str, Any]) -> str:
    def fmt(value: float | None, spec: str, suffix: str = "") -> str:
        return "n/a" if value is None else format(value, spec) + suffix

    versions = report["versions"]
    lines = [
        f"{report['device']}, torch {versions['torch']}, diffusers {versions['diffusers']}, "
        f"{report['size']}, "
        f"{report['steps']} steps, median of {report['runs']}, memory plan {report['memory_plan']}; "
        f"matmul {report['matmul_tflops']:.3g} TFLOP/s, floor {report['floor_s']:.3g} s",
        "",
        "| mode | ran | s/image | warm-up s | peak GiB | vs baseline | vs floor | block work "
        "| latent rel. error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['mode']} | {row['ran']} | {row['seconds']:.3f} | {row['warmup_s']:.1f} "
            f"| {fmt(row['peak_gib'], '.1f')} | {fmt(row['vs_baseline'], '.2f', 'x')} "
            f"| {fmt(row['vs_floor'], '.2f', 'x')} | {fmt(row['block_work'], '.0%')} "
            f"| {row['rel_error']:.2e} |"
        )
    notes = [f"- {row['mode']}: {row['note']}" for row in report["rows"] if row["note"]]
    return "\n".join(lines + (["", *notes] if notes else []))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny model, small size, few steps")
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
    if args.count_blocks is None:
        args.count_blocks = args.tiny
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print(markdown_table(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
