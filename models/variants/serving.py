"""The variants one worker serves, loaded beside the base and handed to the residency manager.

    options = VariantOptions(configured={"fill": "tiny"}, serve=None, pinned=("dev",), ...)
    variants, residency, unavailable = load_variants(options, base_pipe=pipe, ..., presets=...)

`serve`: the names this worker serves (None: every configured one; the base "dev" is always
loaded, since its text encoders and VAE are everyone's). A configured variant the worker does
not serve, or cannot (a memory plan that streams the transformer through the GPU keeps no
variant), is listed in `unavailable` with the reason a job naming it is refused with.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.request import BASE_VARIANT
from models.variants.spec import resolve_variants

if TYPE_CHECKING:
    import torch

    from models.lora.spec import LoraLimits
    from models.memory import MemoryPlan
    from models.presets.apply import PresetManager
    from models.presets.policy import Preset
    from models.residency import Residency
    from models.variants.pipelines import Variant
    from models.weights.check import ModelSpec

logger = logging.getLogger(__name__)

GiB = 1024**3
DEFAULT_GPU_RESERVE_BYTES = 8 * GiB  # activations: ~2.4 GiB at 1024^2, +1.9 GiB per extra image


@dataclass(frozen=True)
class VariantOptions:
    configured: Mapping[str, str] = field(default_factory=dict)  # name -> path, "tiny", "synthetic"
    serve: Sequence[str] | None = None  # this worker's names; None: all configured
    pinned: Sequence[str] = ()  # never evicted from the device
    gpu_budget_bytes: int | None = None  # None: the device's memory minus the reserve (CPU: no limit)
    gpu_reserve_bytes: int = DEFAULT_GPU_RESERVE_BYTES
    host_budget_bytes: int | None = None  # None: half the machine's memory / `box_workers`
    box_workers: int = 1  # workers sharing this machine's memory
    spill_dir: Path | None = None  # default <data_dir>/variant-spill/pid-<pid>
    compile_backend: Any = "inductor"  # tests: "eager" or a CompileCounter


def load_variants(
    options: VariantOptions,
    *,
    model: str,
    spec: ModelSpec,
    base_pipe: Any,
    base_presets: PresetManager,
    plan: MemoryPlan,
    device: str,
    dtype: torch.dtype,
    presets: list[str],
    data_dir: Path,
    lora_limits: LoraLimits,
    preset_table: dict[str, Preset] | None = None,
) -> tuple[dict[str, Variant], Residency | None, dict[str, str]]:
    """Load and place every variant this worker serves; (variants, residency, unavailable)."""
    from models.residency import Residency
    from models.variants.load import load_variant_transformer
    from models.variants.pipelines import build_variant
    from models.variants.placement import TransformerWeights

    specs = resolve_variants(
        options.configured, model=model, base_transformer_config=dict(base_pipe.transformer.config)
    )
    unknown = sorted(set(options.serve or ()) - set(specs) - {BASE_VARIANT})
    if unknown:
        from models.weights.check import WeightsError

        raise WeightsError(f"this worker is to serve {', '.join(unknown)}, which no --variant configures")
    unavailable: dict[str, str] = {}
    served = [n for n in specs if options.serve is None or n in options.serve]
    for name in specs:
        if name not in served:
            unavailable[name] = f"variant {name!r} is not served by this worker (FLUX_WORKER_VARIANTS)"
    if plan.offload != "none" and served:
        why = (
            f"memory plan {plan.name!r} streams the transformer through the GPU, which keeps no "
            "variant; variants need a card of 22 GiB or more (--memory-plan)"
        )
        logger.warning("variants %s are not served: %s", ", ".join(served), why)
        unavailable |= {name: f"variant {name!r} is not available on this worker: {why}" for name in served}
        served = []

    variants: dict[str, Variant] = {}
    for name in served:
        variant_spec = specs[name]
        transformer = load_variant_transformer(
            variant_spec,
            base_transformer=base_pipe.transformer,
            data_dir=data_dir,
            dtype=dtype,
            synthetic=spec.synthetic,
        )
        variants[name] = build_variant(
            name,
            variant_spec.architecture,
            transformer,
            base_pipe=base_pipe,
            plan=plan,
            device=device,
            presets=presets,
            preset_table=preset_table,
            data_dir=data_dir,
            lora_limits=lora_limits,
            compile_backend=options.compile_backend,
            source=variant_spec.value,
        )
        logger.info("variant %s (%s) loaded from %s", name, variant_spec.architecture, variant_spec.value)
    if not variants:
        return variants, None, unavailable

    spill_dir = options.spill_dir or Path(data_dir) / "variant-spill" / f"pid-{os.getpid()}"
    presets_of = {BASE_VARIANT: base_presets, **{n: v.presets for n, v in variants.items()}}
    weights = {
        name: TransformerWeights(name, modules=manager.weight_sets, device=device, spill_dir=spill_dir)
        for name, manager in presets_of.items()
    }
    residency = Residency(
        weights,  # type: ignore[arg-type]
        budget_bytes=gpu_budget(options, base_pipe, device),
        host_budget_bytes=host_budget(options, device),
        pinned=options.pinned,
        first=(BASE_VARIANT,),
    )
    return variants, residency, unavailable


def gpu_budget(options: VariantOptions, base_pipe: Any, device: str) -> int | None:
    """The bytes the variants' transformers may take on the device: the setting, or the
    device's memory minus the reserve and what the shared components hold there."""
    if options.gpu_budget_bytes is not None:
        return options.gpu_budget_bytes
    if not str(device).startswith("cuda"):
        return None
    import torch

    from models.variants.placement import tensor_bytes

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    shared = 0
    for name, module in base_pipe.components.items():
        if name == "transformer" or not isinstance(module, torch.nn.Module):
            continue
        shared += sum(tensor_bytes(t) for t in module.parameters() if t.device.type == "cuda")
    return max(0, total - options.gpu_reserve_bytes - shared)


def host_budget(options: VariantOptions, device: str) -> int | None:
    """The setting, or half the machine's memory shared among its workers; on a CPU device the
    host memory is the device's: no budget of its own unless set."""
    if options.host_budget_bytes is not None:
        return options.host_budget_bytes
    if not str(device).startswith("cuda"):
        return None
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return physical // 2 // max(1, options.box_workers)
