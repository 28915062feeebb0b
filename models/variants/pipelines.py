"""A variant as the runtime runs it: its transformer, the diffusers pipelines that run it (built on
the base's text encoders, tokenizers, VAE and scheduler: no second copy), its presets and its
LoRAs (torch).

    variant = build_variant(name, architecture, transformer, base_pipe, ...)   # at load
    variant.pipeline("fill")     # FluxFillPipeline on the variant's transformer
    variant.tasks                # what it runs

Architectures (models/variants/spec.py): `dev` (the base, Krea, fine-tunes): text-to-image,
image-to-image, inpainting and redux; `fill`: fill; `kontext`: edit, edit-inpainting and
text-to-image.

Presets: each variant has its own PresetManager (its own demotions and notes). Regional
compile installs a compiled forward per block, and dynamo keeps the compiled code per block
class with the parameters as inputs, so every variant of one architecture runs the graphs the
first one compiled: a variant compiles nothing its class has not compiled already, and a
variant that leaves the GPU and comes back keeps its compiled forwards (they live on the
modules, which never change; only their tensors move). A variant keeps one weight set
(presets run on its weights as loaded): a second fp8 copy per variant would cost the room of
another variant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.variants.spec import Architecture

if TYPE_CHECKING:
    from models.lora.manager import LoraManager
    from models.lora.spec import LoraLimits
    from models.memory import MemoryPlan
    from models.presets.apply import PresetManager
    from models.presets.policy import Preset

TASKS: dict[Architecture, tuple[str, ...]] = {
    "dev": ("text-to-image", "image-to-image", "inpainting", "redux"),
    "fill": ("fill",),
    "kontext": ("edit", "edit-inpainting", "text-to-image"),
}


@dataclass
class Variant:
    name: str
    architecture: Architecture
    transformer: Any
    pipes: dict[str, Any]  # task -> the pipeline that runs it ("redux" uses text-to-image's)
    presets: PresetManager
    loras: LoraManager
    source: str = ""  # what was configured, for logs and /health

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS[self.architecture]

    @property
    def text_pipe(self) -> Any:
        """A pipeline of this variant that encodes prompts (all share the base's encoders)."""
        return next(iter(self.pipes.values()))

    def pipeline(self, task: str) -> Any:
        return self.pipes["text-to-image" if task == "redux" else task]


def pipelines_for(architecture: Architecture, components: dict[str, Any]) -> dict[str, Any]:
    """The variant's pipelines, each built from `components` (the base's modules, the variant's
    transformer): constructors register the very same module objects, so nothing is copied."""
    from diffusers import (
        FluxFillPipeline,
        FluxImg2ImgPipeline,
        FluxInpaintPipeline,
        FluxKontextInpaintPipeline,
        FluxKontextPipeline,
        FluxPipeline,
    )

    classes: dict[str, Any]
    if architecture == "fill":
        classes = {"fill": FluxFillPipeline}
    elif architecture == "kontext":
        classes = {
            "edit": FluxKontextPipeline,
            "edit-inpainting": FluxKontextInpaintPipeline,
            "text-to-image": FluxPipeline,
        }
    else:
        classes = {
            "text-to-image": FluxPipeline,
            "image-to-image": FluxImg2ImgPipeline,
            "inpainting": FluxInpaintPipeline,
        }
    pipes = {task: cls(**components) for task, cls in classes.items()}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def place_like_base(transformer: Any, base_pipe: Any, plan: MemoryPlan, device: str) -> None:
    """Give a variant's transformer the form the memory plan gave the base's (fp8 compute or
    storage), and, where the text encoders visit the GPU only to encode, send them back before
    this transformer runs, as the base's pre-hook does (models/memory.py)."""
    from models.memory import quantize_blocks_on, store_blocks_in_fp8

    if plan.transformer == "fp8-compute":
        quantize_blocks_on(transformer, device)
    elif plan.transformer == "fp8-storage":
        store_blocks_in_fp8(transformer)
    if plan.text_encoders == "offload-after-encode" and str(device).startswith("cuda"):
        encoders = [base_pipe.text_encoder, base_pipe.text_encoder_2]

        def offload_text(_module: Any, _args: Any) -> None:
            for encoder in encoders:
                if encoder.device.type != "cpu":
                    encoder.to("cpu")

        transformer.register_forward_pre_hook(offload_text)


def build_variant(
    name: str,
    architecture: Architecture,
    transformer: Any,
    *,
    base_pipe: Any,
    plan: MemoryPlan,
    device: str,
    presets: list[str],
    data_dir: Path,
    lora_limits: LoraLimits,
    compile_backend: Any = "inductor",
    source: str = "",
    preset_table: dict[str, Preset] | None = None,
) -> Variant:
    from models.lora.manager import LoraManager
    from models.presets.apply import PresetManager

    place_like_base(transformer, base_pipe, plan, device)
    components = {**base_pipe.components, "transformer": transformer}
    components = {k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
    pipes = pipelines_for(architecture, components)
    manager = PresetManager(
        transformer,
        device=device,
        enabled=presets,
        data_dir=data_dir,
        presets=preset_table,  # the base's, tuning pieces included
        memory_plan=dataclasses.replace(plan, single_weight_set=True),
        compile_backend=compile_backend,
    )
    compiled = any(p.compile != "none" for p, _ in manager.runnable.values())
    loras = LoraManager(pipes[next(iter(pipes))], limits=lora_limits, compiled=compiled)
    loras.prepare()
    return Variant(name, architecture, transformer, pipes, manager, loras, source)
