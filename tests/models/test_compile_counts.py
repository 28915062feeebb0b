"""Compile you can count: what each preset compiles, under each memory plan a CPU can apply.
(The runtime's own warm-up, with LoRA slots or without: tests/models/lora/test_lora_lazy_slots.py.)

A tiny-width FLUX transformer of 3 double and 3 single blocks (the tiny model's widths, real
block structure) is compiled through `torch._dynamo.testing.CompileCounter` (counts every
graph dynamo hands to a backend, runs it eagerly: seconds, not minutes). Graph breaks come
from dynamo's own counters.

What regional compile must give (`expected_graphs`): per block class, one graph for the first
block of its stack and one shared by all the others, for batch 1 and again for any larger
batch; nothing inside a block breaks the graph; sizes never recompile (dynamic shapes).

Why two per class: dynamo guards on input layouts, and the first block of a stack gets other
layouts than the rest (the first double block: fresh linear outputs, views of a 2-D result;
the first single block: the double stack's outputs, not slices of a concatenation). Why two
batch shapes: dynamo specialises size 1; the first larger batch gets a symbolic batch size
that 2, 3 and 4 all reuse. So a FLUX transformer compiles 8 graphs, whatever its depth.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from models.memory import PLANS, apply_plan
from models.presets.apply import PresetManager
from models.presets.compiling import CompileStats
from models.presets.policy import Hardware
from models.request import MAX_IMAGES

CPU = Hardware("cpu", None, torchao=True, compiler=True)
# Without torchao, `regular` runs the loaded precision with fused QKV: still a weight set of
# its own under the resident plan, without int8's tracing cost (minutes on 2 cores).
CPU_WITHOUT_TORCHAO = Hardware("cpu", None, torchao=False, compiler=True)
BATCH_SHAPES = 2  # batch 1, and every batch from 2 to MAX_IMAGES


def expected_graphs(transformer: torch.nn.Module) -> int:
    """Graphs a regional compile of `transformer` makes for batch 1 and the larger batches."""
    stacks = (transformer.transformer_blocks, transformer.single_transformer_blocks)
    return sum(min(len(blocks), 2) for blocks in stacks) * BATCH_SHAPES


# On a CPU the five plans place the transformer in one of two forms: as loaded, or fp8
# storage (fp8-offload-text's fp8 GEMMs need capability 8.9+ and fall back to storage here).
CPU_FORMS = {
    "resident": "as-loaded",
    "fp8-offload-text": "fp8-storage",
    "fp8-storage-offload-text": "fp8-storage",
    "model-offload": "fp8-storage",
    "sequential-offload": "as-loaded",
}


def three_and_three(tiny_dir: Path):
    """The tiny pipeline with a fresh transformer of 3 double and 3 single blocks."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(tiny_dir / "transformer")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_config(config, num_layers=3, num_single_layers=3)
    pipe = FluxPipeline.from_pretrained(tiny_dir, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, manager: PresetManager, preset: str, *, size: tuple[int, int] = (64, 64), images: int = 1):
    with manager.use(pipe, preset, steps=1) as active:
        pipe(
            prompt="a red chair",
            width=size[0],
            height=size[1],
            num_inference_steps=1,
            num_images_per_prompt=images,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="latent",
        )
    return active


@pytest.mark.parametrize("plan_name", list(CPU_FORMS))
def test_each_plan_places_the_transformer_in_one_of_two_forms_on_a_cpu(
    tiny_model_dir: Path, plan_name: str
) -> None:
    pipe = three_and_three(tiny_model_dir)
    assert apply_plan(pipe, PLANS[plan_name], "cpu").transformer == CPU_FORMS[plan_name]


@pytest.mark.slow  # 30-60 s each on 2 shared cores: dynamo traces 8 block graphs
@pytest.mark.parametrize("plan_name", ["resident", "fp8-storage-offload-text"])
def test_each_preset_compiles_the_expected_graphs_and_no_request_recompiles(
    tiny_model_dir: Path, plan_name: str
) -> None:
    pipe = three_and_three(tiny_model_dir)
    plan = apply_plan(pipe, PLANS[plan_name], "cpu")
    torch._dynamo.reset()
    counter = CompileCounter()
    manager = PresetManager(
        pipe.transformer,
        device="cpu",
        enabled=["none", "regular", "high"],
        data_dir=tiny_model_dir.parent,
        compile_backend=counter,
        hardware=CPU_WITHOUT_TORCHAO,
        memory_plan=plan,
    )
    compiled = {name: preset.compile for name, (preset, _) in manager.runnable.items()}
    assert compiled == {"none": "none", "regular": "regional", "high": "regional"}
    weight_sets = {preset.weight_set for preset, _ in manager.runnable.values()}
    # resident: `none` on the loaded weights, `regular` and `high` share the fused-QKV copy
    assert len(weight_sets) == (1 if plan.single_weight_set else 2)

    per_preset = {}
    for name in ("none", "regular", "high"):
        before = (counter.frame_count, CompileStats.now())
        manager.warmup(pipe, [(64, 64)], steps=1, max_images=MAX_IMAGES, names=[name])
        per_preset[name] = counter.frame_count - before[0]
        assert (CompileStats.now() - before[1]).graph_breaks == 0, f"{name}: a graph break"
    # `high` is `regular` plus a step cache around the very same compiled blocks.
    assert per_preset == {"none": 0, "regular": expected_graphs(pipe.transformer), "high": 0}
    assert expected_graphs(pipe.transformer) == 8

    warmed = counter.frame_count
    for name in ("regular", "high", "none"):
        for images in range(1, MAX_IMAGES + 1):
            assert run(pipe, manager, name, images=images).name == name
        assert run(pipe, manager, name, size=(96, 64)).name == name  # another size: dynamic
    assert counter.frame_count == warmed, "a request of a warmed size compiled"
