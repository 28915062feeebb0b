"""Memory plans: where FLUX.1 [dev]'s ~33 GB of bf16 weights live on cards of 8 to 141 GB.

How the runtime uses it (models/loading.py), once, after loading the pipeline on the CPU:

    plan = choose_plan(vram_bytes(device), forced=settings.memory_plan,
                       capability=cuda_capability(device), torchao=...)   # "auto" or a name
    plan = apply_plan(pipe, plan, device)   # places components; returns the plan it applied
    manager = PresetManager(..., memory_plan=plan)
    ...
    enable_vae_tiling_if_large(pipe.vae, width, height, plan)   # before each decode

Plans, from most to least resident (`PLANS`; the expected peaks are `expected_peak_bytes`,
computed from FLUX.1 [dev]'s parameter counts, NOT measured: no GPU was lent; the bench
script measures them on one):

- resident (>= 70 GiB): everything on the GPU, and every preset's weight set (~34 GiB with
  the bf16 weights, ~45 GiB with the fp8 copy `regular` runs on).
- fp8-offload-text (22-70 GiB, compute capability >= 8.9 with torchao): the transformer is
  quantized with torchao's float8 dynamic row-wise linears (real fp8 GEMMs on Ada, Hopper,
  Blackwell), so every preset runs on fp8 matrix units; CLIP and T5 visit the GPU only while
  encoding (~20 GiB while T5 encodes, ~14 GiB while denoising).
- fp8-storage-offload-text (22-70 GiB without fp8 matrix units: Ampere, e.g. A6000, A100
  40 GB, RTX 3090): linear weights stored in fp8 and cast to the compute dtype a block at a
  time (bf16 compute); text encoders as above.
- model-offload (15.5-22 GiB: 16 GB cards): fp8-storage transformer; each component on the GPU
  only while it runs (~14 GiB).
- sequential-offload (< 15.5 GiB): weights stream to the GPU layer by layer; slow, last resort.

fp8 storage casts whole blocks in a forward pre-hook and back in a forward hook (torch's module
hooks, which run around `forward`): a regionally compiled block's forward then holds no cast
at all, so compile sees one graph per block class instead of one graph break per linear layer
(which diffusers' per-layer `enable_layerwise_casting` hooks give under compile).

Thresholds are in GiB of total device memory as CUDA reports it (an "80 GB" H100 reports
~79 GiB, a "24 GB" card ~23.6 GiB). Without a GPU (`vram_bytes is None`) everything stays
resident on the CPU. Every plan tiles the VAE decode above `vae_tiling_min_pixels`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

GiB = 1024**3
FP8_COMPUTE_CAPABILITY = (8, 9)

log = logging.getLogger(__name__)

PlanName = Literal[
    "resident", "fp8-offload-text", "fp8-storage-offload-text", "model-offload", "sequential-offload"
]
TransformerForm = Literal["as-loaded", "fp8-storage", "fp8-compute"]


@dataclass(frozen=True)
class MemoryPlan:
    name: PlanName
    min_vram_gib: float  # chosen automatically at or above this much VRAM
    # fp8-storage: fp8 weights cast to the compute dtype per block; fp8-compute: torchao fp8 GEMMs
    transformer: TransformerForm
    text_encoders: Literal["resident", "offload-after-encode", "offloaded"]
    offload: Literal["none", "model", "sequential"]
    # Presets may keep several transformer weight sets (bf16 + fp8 variant) only when resident.
    single_weight_set: bool
    vae_tiling_min_pixels: int = 1536 * 1536

    @property
    def all_resident(self) -> bool:
        """Every component lives on the device for good (nothing is offloaded)."""
        return self.offload == "none" and self.text_encoders == "resident"

    @property
    def base_precision(self) -> str:
        """The precision of the transformer's own weights under this plan ("fp8" or "bf16",
        i.e. as loaded): what every preset runs on when the plan keeps one weight set."""
        return "fp8" if self.transformer == "fp8-compute" else "bf16"

    @property
    def expected_peak_gib(self) -> float:
        """Expected peak at 1024x1024, one image (computed, not measured)."""
        return expected_peak_bytes(self) / GiB


PLANS: dict[str, MemoryPlan] = {
    "resident": MemoryPlan("resident", 70, "as-loaded", "resident", "none", False),
    "fp8-offload-text": MemoryPlan(
        "fp8-offload-text", 22, "fp8-compute", "offload-after-encode", "none", True
    ),
    "fp8-storage-offload-text": MemoryPlan(
        "fp8-storage-offload-text", 22, "fp8-storage", "offload-after-encode", "none", True
    ),
    # 15.5: the fp8 transformer (~11 GiB) and its activations must fit at once; 16 GB cards
    # report ~15.7 GiB, 12 GB cards stream layer by layer.
    "model-offload": MemoryPlan("model-offload", 15.5, "fp8-storage", "offloaded", "model", True),
    "sequential-offload": MemoryPlan("sequential-offload", 0, "as-loaded", "offloaded", "sequential", True),
}
# What a plan that needs fp8 matrix units becomes where there are none.
WITHOUT_FP8_COMPUTE = {"fp8-offload-text": "fp8-storage-offload-text"}


# ---------------------------------------------------------------------- expected peaks

# FLUX.1 [dev]'s parameter counts (the published checkpoints).
TRANSFORMER_BLOCK_LINEAR_PARAMS = 11.80e9  # the 19 double + 38 single blocks' linear weights
TRANSFORMER_OTHER_PARAMS = 0.10e9  # embedders, norms, biases, the output layer: never fp8
LARGEST_BLOCK_PARAMS = 0.34e9  # one double block (cast to bf16 at once under fp8 storage)
LARGEST_LAYER_PARAMS = 0.075e9  # the largest single linear (sequential offload streams layers)
T5_PARAMS = 4.76e9
CLIP_PARAMS = 0.123e9
VAE_PARAMS = 0.084e9
BF16 = 2
# Activations and workspace while denoising 1024x1024, one image, bf16 (published resident
# bf16 peak 33.9 GiB minus its weights); scales with pixels x images.
DENOISE_ACTIVATIONS_BYTES = 2.5 * GiB
# The VAE decode of one 1024x1024 image without tiling (tiled above vae_tiling_min_pixels).
DECODE_ACTIVATIONS_BYTES = 3.0 * GiB


def expected_peak_bytes(plan: MemoryPlan, *, width: int = 1024, height: int = 1024, images: int = 1) -> int:
    """The most device memory the plan should need at once (expected, not measured): what stays
    on the device for good, plus the largest of what each phase (encode, denoise, decode)
    brings along. An estimate from parameter counts; the bench measures the real peak."""
    scale = width * height * images / 1024**2
    fp8_linear = TRANSFORMER_BLOCK_LINEAR_PARAMS  # one byte each
    transformer = {
        "as-loaded": (TRANSFORMER_BLOCK_LINEAR_PARAMS + TRANSFORMER_OTHER_PARAMS) * BF16,
        "fp8-compute": fp8_linear + TRANSFORMER_OTHER_PARAMS * BF16,
        # one block at a time in the compute dtype, beside its fp8 copy being replaced
        "fp8-storage": fp8_linear + TRANSFORMER_OTHER_PARAMS * BF16 + LARGEST_BLOCK_PARAMS * BF16,
    }[plan.transformer]
    text = (T5_PARAMS + CLIP_PARAMS) * BF16
    vae = VAE_PARAMS * BF16
    denoise = DENOISE_ACTIVATIONS_BYTES * scale
    tiled = width * height > plan.vae_tiling_min_pixels
    decode = DECODE_ACTIVATIONS_BYTES * (min(scale, 1.0) if tiled else scale)
    if plan.offload == "sequential":
        # weights stream layer by layer: the largest layer (T5's embedding is similar) at a time
        peak = LARGEST_LAYER_PARAMS * BF16 + max(denoise, decode)
    elif plan.offload == "model":  # one component at a time
        peak = max(T5_PARAMS * BF16, transformer + denoise, vae + decode)
    else:
        resident = transformer + vae
        if not plan.single_weight_set:  # `regular`'s fp8 copy beside the loaded weights
            resident += fp8_linear
        if plan.text_encoders == "resident":
            resident += text
            peak = resident + max(denoise, decode)
        else:  # the encoders visit while encoding, before any activation exists
            peak = resident + max(text, denoise, decode)
    return int(peak)


# ---------------------------------------------------------------------- choosing and applying


def choose_plan(
    vram_bytes: int | None,
    forced: str = "auto",
    *,
    capability: tuple[int, int] | None = None,
    torchao: bool = True,
) -> MemoryPlan:
    """The plan for a card with `vram_bytes` of memory (None: no GPU) and CUDA compute
    `capability`, unless `forced` names one. fp8 compute needs capability 8.9+ and torchao;
    without either, the same card gets bf16 compute over fp8 storage."""
    if forced != "auto":
        if forced not in PLANS:
            raise ValueError(f"unknown memory plan {forced!r}; choose auto or one of {', '.join(PLANS)}")
        return PLANS[forced]
    if vram_bytes is None:
        return PLANS["resident"]  # CPU: nothing to offload to
    fp8_compute = torchao and capability is not None and capability >= FP8_COMPUTE_CAPABILITY
    gib = vram_bytes / GiB
    for plan in PLANS.values():  # ordered from most to least resident
        if plan.transformer == "fp8-compute" and not fp8_compute:
            continue
        if gib >= plan.min_vram_gib:
            return plan
    return PLANS["sequential-offload"]


def vram_bytes(device: str) -> int | None:
    """Total memory of a CUDA device, or None for the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def cuda_capability(device: str) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`, or None for the CPU."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(torch.device(device)))  # type: ignore[return-value]


def apply_plan(pipe: Any, plan: MemoryPlan, device: str) -> MemoryPlan:
    """Place the pipeline's components according to `plan`. Call once after loading; returns
    the plan applied: a plan whose fp8 quantization fails here (no fp8 matrix units, torchao
    missing or broken) becomes its fp8-storage form, and the log says why.

    Pipelines built later from the same components (img2img, redux) share the placement."""
    import torch

    on_gpu = torch.device(device).type == "cuda"
    if plan.transformer == "fp8-compute":
        try:
            quantize_blocks_on(pipe.transformer, device)
        except Exception as exc:  # e.g. torchao's assertion about the compute capability
            fallback = PLANS[WITHOUT_FP8_COMPUTE[plan.name]]
            log.warning(
                "memory plan %s: fp8 quantization failed (%s: %s); using %s (bf16 compute over fp8 storage)",
                plan.name,
                type(exc).__name__,
                str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                fallback.name,
            )
            plan = fallback
    if plan.transformer == "fp8-storage":
        store_blocks_in_fp8(pipe.transformer)

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
    return plan


def quantize_blocks_on(transformer: Any, device: str) -> None:
    """torchao fp8 dynamic row-wise linears in every repeated block, quantized block by block on
    `device` (torchao quantizes where it computes): the device never holds more than one bf16
    block beside the fp8 ones. The rest of the transformer (~0.1 B parameters) stays as loaded.
    A failure on the first block (no fp8 matrix units, no torchao) leaves the model unchanged."""
    from models.presets.weights import quantize

    blocks = [m for m in transformer.modules() if m.__class__.__name__ in transformer._repeated_blocks]
    for index, block in enumerate(blocks):
        block.to(device)
        try:
            quantize(block, "fp8")
        except Exception:
            if index == 0:
                block.to("cpu")  # back where the loader left it
            raise
    transformer.to(device)


def store_blocks_in_fp8(transformer: Any, storage: Any = None) -> int:
    """Keep the linear weights of the repeated blocks in fp8 (`storage`, default e4m3) and
    cast each block's to the compute dtype just before it runs and back right after; returns
    how many weights are stored so. Norm layers (and their modulation linears), biases and
    everything outside the blocks keep the loaded dtype, as diffusers' layerwise casting does.

    The casts are torch module hooks, outside the block's `forward`, so a compiled forward
    traces none of them. The weights are fixed here: adapters added later (LoRAs) are never
    cast to fp8. fp8 -> bf16 -> fp8 is exact, so the round trips lose nothing."""
    import torch

    storage = storage or torch.float8_e4m3fn
    compute = transformer.dtype
    stored = 0
    for block in transformer.modules():
        if block.__class__.__name__ not in transformer._repeated_blocks:
            continue
        weights = [
            module.weight
            for name, module in block.named_modules()
            if isinstance(module, torch.nn.Linear) and "norm" not in name
        ]

        def cast(dtype: torch.dtype, weights: list[torch.nn.Parameter] = weights) -> None:
            for weight in weights:
                weight.data = weight.data.to(dtype)

        cast(storage)
        block.register_forward_pre_hook(lambda _m, _a, cast=cast: cast(compute))
        block.register_forward_hook(lambda _m, _a, _o, cast=cast: cast(storage))
        stored += len(weights)
    return stored


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
