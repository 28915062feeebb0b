"""Memory plans: where FLUX.1 [dev]'s ~33 GB of bf16 weights live on cards of 12 to 80 GB.

How the runtime uses it (models/runtime.py), once, after loading the pipeline on the CPU:

    plan = choose_plan(vram_bytes(device), forced=settings.memory_plan)   # "auto" or a plan name
    apply_plan(pipe, plan, device)          # moves / offloads components
    manager = PresetManager(..., memory_plan=plan)
    ...
    enable_vae_tiling_if_large(pipe.vae, width, height, plan)   # before each decode

Plans, from most to least resident. Peaks at 1024x1024, batch 1, are the EXPECTED figures
from published measurements (the diffusers and PyTorch blog figures for FLUX.1 [dev]), NOT
measured by this project: no GPU was available; `scripts/bench_gpu.py` measures them when run on one.

- resident (>= 70 GiB): everything on the GPU, and every preset's weight set. Expected peak
  ~34 GiB with bf16 only (33.9 GiB published), ~46 GiB with the fp8 variant of `regular` too.
- fp8-offload-text (22-70 GiB): transformer stored in fp8 (layerwise casting) on the GPU; CLIP
  and T5 visit the GPU only while encoding. Expected peak ~21 GiB (T5 9.5 GB + the fp8
  transformer ~12 GB during encoding; ~14 GiB while denoising).
- model-offload (12-22 GiB): fp8-storage transformer; each component on the GPU only while it
  runs. Expected peak ~14 GiB (transformer + activations).
- sequential-offload (< 12 GiB): weights stream to the GPU layer by layer; slow, last resort.
  Expected peak ~3 GiB.

Thresholds are in GiB of total device memory as CUDA reports it (an "80 GB" H100 reports
~79 GiB, a "24 GB" card ~23.6 GiB). Without a GPU (`vram_bytes is None`) everything stays
resident on the CPU. Every plan tiles the VAE decode above `vae_tiling_min_pixels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

GiB = 1024**3

PlanName = Literal["resident", "fp8-offload-text", "model-offload", "sequential-offload"]


@dataclass(frozen=True)
class MemoryPlan:
    name: PlanName
    min_vram_gib: float  # chosen automatically at or above this much VRAM
    transformer_storage: Literal["as-loaded", "fp8"]  # fp8: layerwise casting (storage only)
    text_encoders: Literal["resident", "offload-after-encode", "offloaded"]
    offload: Literal["none", "model", "sequential"]
    # Presets may keep several transformer weight sets (bf16 + fp8 variant) only when resident.
    single_weight_set: bool
    vae_tiling_min_pixels: int = 1536 * 1536
    expected_peak_gib: float | None = None  # published-figure estimate at 1024x1024, not measured

    @property
    def all_resident(self) -> bool:
        """Every component lives on the device for good (nothing is offloaded)."""
        return self.offload == "none" and self.text_encoders == "resident"


PLANS: dict[str, MemoryPlan] = {
    "resident": MemoryPlan("resident", 70, "as-loaded", "resident", "none", False, expected_peak_gib=34.0),
    "fp8-offload-text": MemoryPlan(
        "fp8-offload-text", 22, "fp8", "offload-after-encode", "none", True, expected_peak_gib=21.0
    ),
    "model-offload": MemoryPlan(
        "model-offload", 12, "fp8", "offloaded", "model", True, expected_peak_gib=14.0
    ),
    "sequential-offload": MemoryPlan(
        "sequential-offload", 0, "as-loaded", "offloaded", "sequential", True, expected_peak_gib=3.0
    ),
}


def choose_plan(vram_bytes: int | None, forced: str = "auto") -> MemoryPlan:
    """The plan for a card with `vram_bytes` of memory (None: no GPU), unless `forced` names one."""
    if forced != "auto":
        if forced not in PLANS:
            raise ValueError(f"unknown memory plan {forced!r}; choose auto or one of {', '.join(PLANS)}")
        return PLANS[forced]
    if vram_bytes is None:
        return PLANS["resident"]  # CPU: nothing to offload to
    gib = vram_bytes / GiB
    for plan in PLANS.values():  # ordered from most to least resident
        if gib >= plan.min_vram_gib:
            return plan
    return PLANS["sequential-offload"]


def vram_bytes(device: str) -> int | None:
    """Total memory of a CUDA device, or None for the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def apply_plan(pipe: Any, plan: MemoryPlan, device: str) -> None:
    """Place the pipeline's components according to `plan`. Call once after loading.

    Pipelines built later from the same components (img2img, redux) share the placement."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    if plan.transformer_storage == "fp8":
        compute = pipe.transformer.dtype
        # Storage only: weights are held in fp8 and upcast per layer (~half the memory of bf16).
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)

    if not on_gpu or plan.all_resident:
        pipe.to(device)
    elif plan.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif plan.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:  # offload-after-encode: the transformer and VAE resident, text encoders visit the GPU
        pipe.transformer.to(device)
        pipe.vae.to(device)
        offload_text_encoders_after_encoding(pipe, device)


def offload_text_encoders_after_encoding(pipe: Any, device: str) -> list[Any]:
    """CLIP and T5 move to `device` when called and back to the CPU before the transformer runs.

    accelerate's chained hooks: T5 running offloads CLIP; a pre-hook on the transformer
    offloads T5. So T5 (9.5 GB in bf16) never shares the GPU with the denoising activations."""
    from accelerate import cpu_offload_with_hook

    hooks = []
    previous = None
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        _, previous = cpu_offload_with_hook(encoder, device, prev_module_hook=previous)
        hooks.append(previous)
    last = previous

    def offload_text(_module: Any, _args: Any) -> None:
        last.offload()

    pipe.transformer.register_forward_pre_hook(offload_text)
    return hooks


def enable_vae_tiling_if_large(vae: Any, width: int, height: int, plan: MemoryPlan) -> bool:
    """Tile the VAE decode for images above the plan's pixel threshold; returns whether tiled."""
    tiled = width * height > plan.vae_tiling_min_pixels
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
    return tiled
