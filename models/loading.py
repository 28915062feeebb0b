"""Build a FluxRuntime: load the weights, assemble the pipelines, place them on the device.

    runtime = load_runtime("tiny" | folder | file.safetensors, data_dir=Path(...),
                           components_dir=None, safety_checker=Path | None,
                           device="auto" | "cpu" | "cuda",
                           presets=("none", "regular", "high"), memory_plan="auto",
                           variants=VariantOptions(configured={"fill": "/w/fill"}, ...),
                           tuning=())   # tuning pieces on every preset but none

The order matters: the model is resolved (checked)
before the slow imports, components are placed by the memory plan before the img2img pipeline
is built from them (so both share the placed modules), and the preset manager comes last
because its variants are copies of the placed transformer. The family's other checkpoints
(models/variants/) come last: each takes the base's placed components and its own presets.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from models import versions

if TYPE_CHECKING:
    import torch
    from diffusers import FluxPipeline, FluxPriorReduxPipeline

    from models.lora.spec import LoraLimits
    from models.memory import MemoryPlan
    from models.runtime import FluxRuntime
    from models.variants.serving import VariantOptions

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """ "auto" -> "cuda" when torch sees a GPU, else "cpu"; refuses "cuda" without one."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return device


def compute_dtype(device: str, *, synthetic: bool) -> torch.dtype:
    """bf16 on a GPU, as the real weights. On a CPU, fp32, except random (synthetic) weights
    on a CPU with native bf16 matmuls (AVX512-BF16/AMX), where bf16 keeps them as on a GPU at
    half the memory. Without native bf16 a CPU emulates it about 6x slower than fp32 (measured
    on an AVX2 EPYC: 8 vs 48 GFLOPS), which made the synthetic CPU smoke run for 15 minutes."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if synthetic and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_runtime(
    model: str = "tiny",
    *,
    data_dir: Path,
    components_dir: Path | None = None,
    safety_checker: Path | None = None,
    device: str = "auto",
    presets: Sequence[str] | None = None,
    memory_plan: str = "auto",
    lora_limits: LoraLimits | None = None,
    variants: VariantOptions | None = None,
    tuning: Sequence[str] = (),
) -> FluxRuntime:
    """`presets`: the acceleration presets to prepare; None or empty: the device's default
    (models.presets.policy.default_presets). `lora_limits`: per-request LoRA bounds.
    `variants`: the family's other checkpoints this worker serves (None: the base alone, or
    every tiny variant with model "tiny": models/variants/spec.py `configured_variants`).
    `tuning`: tuning pieces (models.presets.policy.TUNING) on every preset but `none`."""
    from models.weights.check import resolve_model
    from models.weights.offline import enforce_offline

    enforce_offline()  # before anything can reach for the hub
    started = time.perf_counter()
    # Resolve first: a broken --model fails before the slow torch/diffusers imports.
    spec = resolve_model(model, data_dir=Path(data_dir), components_dir=components_dir)
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline, FluxPriorReduxPipeline

    from models.lora.manager import LoraManager
    from models.lora.spec import LoraLimits
    from models.memory import choose_plan, cuda_capability, vram_bytes
    from models.presets.apply import PresetManager
    from models.presets.policy import default_presets, tuned_presets
    from models.runtime import FluxRuntime
    from models.safety import SafetyChecker
    from models.weights.load import load_components

    device = resolve_device(device)
    dtype = compute_dtype(device, synthetic=spec.kind == "synthetic")
    plan = choose_plan(  # ValueError for an unknown name
        vram_bytes(device),
        forced=memory_plan,
        capability=cuda_capability(device),
        torchao=importlib.util.find_spec("torchao") is not None,
    )
    # Weights made at load time (synthetic) are made where the plan keeps them, so a card
    # smaller than the model never holds all of it at once.
    parts = load_components(spec, dtype=dtype, device=device if plan.all_resident else "cpu")

    pipe = FluxPipeline(**parts.pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)  # progress goes through on_step
    redux = None
    if parts.redux_image_encoder is not None and parts.redux_image_embedder is not None:
        # The prior as published pads with zeros of FLUX's full text width; given the
        # runtime's text encoders it encodes a real (possibly empty) prompt instead.
        redux = FluxPriorReduxPipeline(
            image_encoder=parts.redux_image_encoder,
            feature_extractor=parts.redux_feature_extractor,
            image_embedder=parts.redux_image_embedder,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer_2=pipe.tokenizer_2,
        )
        redux.set_progress_bar_config(disable=True)

    plan = _apply_memory_plan(pipe, redux, plan, device=device)  # the plan it could apply
    # Built after placement so that it shares the very same (already placed) modules.
    img2img = FluxImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    inpaint = FluxInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)

    safety = None
    if safety_checker is not None:
        safety = SafetyChecker(Path(safety_checker), device=device)
    else:
        logger.warning(
            "no safety checker configured (--safety-checker): images are not checked, "
            "has_nsfw_concepts is always false and nsfw_checked false"
        )

    preset_table = tuned_presets(tuning)  # the same presets on the base and every variant
    preset_manager = PresetManager(
        pipe.transformer,
        device=device,
        enabled=list(presets) if presets else default_presets(device),
        data_dir=Path(data_dir),
        presets=preset_table,
        memory_plan=plan,
    )
    # Compiled presets switch LoRAs by hot-swap: slots made at the first LoRA request (or now,
    # with lora_hotswap=eager, so that warm-up compiles the LoRA graphs too).
    compiled = any(p.compile != "none" for p, _ in preset_manager.runnable.values())
    limits = lora_limits or LoraLimits()
    problem = versions.hotswap_problem() if compiled and limits.hotswap != "off" else None
    if problem:
        logger.warning(
            "%s: LoRA hot-swap is off, so LoRA requests run the compiled presets eager "
            "(pip install 'peft>=0.17'; constraints/gpu.txt pins the tested one)",
            problem,
        )
        limits = dataclasses.replace(limits, hotswap="off")
    loras = LoraManager(pipe, limits=limits, compiled=compiled)
    loras.prepare()
    from models.variants.serving import VariantOptions, load_variants

    loaded_variants, residency, unavailable = load_variants(
        variants or VariantOptions(),
        model=model,
        spec=spec,
        base_pipe=pipe,
        base_presets=preset_manager,
        plan=plan,
        device=device,
        dtype=dtype,
        presets=list(presets) if presets else default_presets(device),
        preset_table=preset_table,
        data_dir=Path(data_dir),
        lora_limits=limits,
    )
    logger.info(
        "loaded %s on %s (%s, memory plan %s) in %.1fs; redux %s",
        spec.name,
        device,
        str(dtype).removeprefix("torch."),
        plan.name,
        time.perf_counter() - started,
        "available" if redux is not None else "not available",
    )
    return FluxRuntime(
        pipe=pipe,
        img2img=img2img,
        inpaint=inpaint,
        redux=redux,
        safety=safety,
        presets=preset_manager,
        memory_plan=plan,
        device=device,
        model_name=spec.name,
        loras=loras,
        model_kind=spec.kind,
        variants=loaded_variants,
        residency=residency,
        unavailable=unavailable,
    )


# MEMORY PLAN: the single place where components are placed on the device at load
# (models/memory.py decides; "auto" follows the card's VRAM, resident on a CPU). The only
# other use of the plan is VAE tiling before a large decode (FluxRuntime._decode).
def _apply_memory_plan(
    pipe: FluxPipeline, redux: FluxPriorReduxPipeline | None, plan: MemoryPlan, *, device: str
) -> MemoryPlan:
    from models.memory import apply_plan

    plan = apply_plan(pipe, plan, device)
    if redux is not None:
        # The prior's own parts (SigLIP, embedder: ~1 GB) stay resident; its text encoders
        # are the pipeline's, already placed by the plan.
        redux.image_encoder.to(device)
        redux.image_embedder.to(device)
    return plan
