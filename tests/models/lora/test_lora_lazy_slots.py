"""LoRA slots only when LoRAs are used (`lora_hotswap=lazy`, the default) on a compiled preset,
and the runtime's warm-up: one compile, covering every `num_images`.

A private tiny runtime whose `regular` is a regional compile on the loaded weights, compiled
through `torch._dynamo.testing.CompileCounter` (counts graphs, runs them eagerly). Dynamo
traces each graph for several seconds on 2 cores: the tests that compile are marked slow.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from torch._dynamo.testing import CompileCounter

from models.loading import load_runtime
from models.lora import LoraLimits, LoraSpec
from models.lora.manager import LoraManager
from models.presets.apply import PresetManager
from models.presets.policy import Hardware, Preset
from models.request import MAX_IMAGES
from models.runtime import FluxRuntime, Generation
from tests.models.lora.helpers import generate
from tests.models.test_compile_counts import expected_graphs

CPU = Hardware("cpu", None, torchao=True, compiler=True)


def compiled_runtime(tiny_model_dir: Path, limits: LoraLimits) -> tuple[FluxRuntime, CompileCounter]:
    torch._dynamo.reset()
    counter = CompileCounter()
    runtime = load_runtime("tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",))
    runtime.presets = PresetManager(
        runtime.pipe.transformer,
        device="cpu",
        enabled=["none", "regular"],
        data_dir=tiny_model_dir.parent,
        presets={"none": Preset("none"), "regular": Preset("regular", compile="regional")},
        compile_backend=counter,
        hardware=CPU,
    )
    runtime.loras = LoraManager(runtime.pipe, limits=limits, compiled=True)
    runtime.loras.prepare()  # as load_runtime does: nothing unless lora_hotswap=eager
    return runtime, counter


def slotted_layers(runtime: FluxRuntime) -> set[str]:
    return {name for name, m in runtime.pipe.transformer.named_modules() if isinstance(m, LoraLayer)}


def adapters_held(runtime: FluxRuntime) -> set[str]:
    layers = [m for m in runtime.pipe.transformer.modules() if isinstance(m, LoraLayer)]
    return {name for layer in layers for name in layer.lora_A}


def adapted_layers(file: Path) -> set[str]:
    with safe_open(str(file), "pt") as handle:
        return {key.removeprefix("transformer.").split(".lora_")[0] for key in handle.keys()}  # noqa: SIM118


def pixels(out: Generation) -> np.ndarray:
    return np.asarray(out.images[0], float)


@pytest.mark.slow  # ~1 min on 2 shared cores
def test_cold_start_without_loras_is_one_compile_covering_every_num_images(tiny_model_dir: Path) -> None:
    assert LoraLimits().hotswap == "lazy" and LoraLimits().hotswap_rank == 64  # the defaults
    runtime, counter = compiled_runtime(tiny_model_dir, LoraLimits())
    runtime.warmup([(64, 64)])
    assert slotted_layers(runtime) == set()
    graphs = expected_graphs(runtime.pipe.transformer)  # 6: the tiny model has 1 double block
    assert counter.frame_count == runtime.warmup_compiled.graphs == graphs  # no slotted compile
    assert runtime.warmup_compiled.seconds > 0
    for images in (MAX_IMAGES, 1, 2, 3):  # warm-up covered one image and the most a request asks
        out = generate(runtime, acceleration="regular", num_images=images)
        assert (out.preset, len(out.images)) == ("regular", images)
        assert out.compiled.graphs == 0 and out.compiled.seconds == 0
    assert counter.frame_count == graphs
    assert slotted_layers(runtime) == set()


@pytest.mark.slow  # ~1-2 min on 2 shared cores
def test_the_first_lora_request_makes_slots_on_its_layers_then_loras_hot_swap(
    tiny_model_dir: Path, lora_file: Callable[..., Path], lora_runtime: FluxRuntime
) -> None:
    limits = LoraLimits(max_rank=8, max_per_request=2, hotswap_rank=8)
    runtime, counter = compiled_runtime(tiny_model_dir, limits)
    a = LoraSpec("a", lora_file("a", seed=1))
    b = LoraSpec("b", lora_file("b", seed=2))

    first = generate(runtime, acceleration="regular", loras=[a])
    assert slotted_layers(runtime) == adapted_layers(a.file)  # only the layers the LoRA adapts
    assert any("hot-swapped into slot" in line for line in first.log)
    assert first.compiled.graphs > 0  # the slotted graph, compiled inside this first request
    plain_adapter = generate(lora_runtime, loras=[a])
    assert np.abs(pixels(first) - pixels(plain_adapter)).max() <= 2

    generate(runtime, acceleration="regular")  # the plain graph with slots present (counted)
    graphs = counter.frame_count
    outs = {
        "b": generate(runtime, acceleration="regular", loras=[b]),
        "a+b": generate(runtime, acceleration="regular", loras=[LoraSpec("a", a.file, 0.5), b]),
        "a": generate(runtime, acceleration="regular", loras=[a]),
        "plain": generate(runtime, acceleration="regular"),
    }
    assert counter.frame_count == graphs, "switching hot-swapped LoRAs recompiled"
    assert all(out.compiled.graphs == 0 for out in outs.values())
    assert np.array_equal(pixels(outs["a"]), pixels(first))
    assert np.abs(pixels(outs["b"]) - pixels(generate(lora_runtime, loras=[b]))).max() <= 2

    # A LoRA adapting more layers (kohya: modulation and MLP layers too) widens the slots.
    k = LoraSpec("k", lora_file("kohya", layout="kohya", seed=11))
    wide = generate(runtime, acceleration="regular", loras=[k])
    assert slotted_layers(runtime) >= adapted_layers(a.file) | {"transformer_blocks.0.norm1.linear"}
    assert np.abs(pixels(wide) - pixels(generate(lora_runtime, loras=[k]))).max() <= 2
    again = generate(runtime, acceleration="regular", loras=[a])  # re-copied into the new slots
    assert np.abs(pixels(again) - pixels(first)).max() <= 2


def test_a_lora_above_the_slots_rank_runs_eager_on_a_temporary_adapter(
    tiny_model_dir: Path, lora_file: Callable[..., Path], lora_runtime: FluxRuntime
) -> None:
    runtime, _ = compiled_runtime(tiny_model_dir, LoraLimits(max_rank=16, hotswap_rank=4))
    big = LoraSpec("big", lora_file("rank8", seed=3, rank=8))
    out = generate(runtime, acceleration="regular", loras=[big])
    assert any("has rank 8, above the hot-swap slots' rank 4" in line for line in out.log)
    assert np.abs(pixels(out) - pixels(generate(lora_runtime, loras=[big]))).max() <= 2
    assert not runtime.loras.slots_ready  # nothing slotted: the adapter was temporary
    assert adapters_held(runtime) == set()


def test_hotswap_off_runs_lora_requests_eagerly_without_slots(
    tiny_model_dir: Path, lora_file: Callable[..., Path]
) -> None:
    runtime, counter = compiled_runtime(tiny_model_dir, LoraLimits(max_rank=8, hotswap="off"))
    # Never warmed: a compiled request would compile here; an eager one compiles nothing.
    out = generate(runtime, acceleration="regular", loras=[LoraSpec("a", lora_file("a", seed=1))])
    assert out.preset == "regular" and out.compiled.graphs == 0 and counter.frame_count == 0
    assert any("LoRA hot-swap is off" in line for line in out.log)
    assert runtime.loras.mode == "adapters"


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_the_setting_reaches_the_runtime(tiny_model_dir: Path, mode: str) -> None:
    """`lora_hotswap=eager` makes the slots at load, on every linear layer."""
    runtime, _ = compiled_runtime(tiny_model_dir, LoraLimits(hotswap=mode, hotswap_rank=4))  # type: ignore[arg-type]
    assert runtime.loras.slots_ready == (mode == "eager")
    assert bool(slotted_layers(runtime)) == (mode == "eager")


def test_loras_hot_swap_on_a_torchao_quantized_transformer(
    tiny_model_dir: Path, lora_file: Callable[..., Path]
) -> None:
    """The fp8-offload-text plan quantizes the transformer's blocks with torchao (fp8 on a GPU of
    capability 8.9+); on a CPU int8 stands in: LoRA slots wrap torchao layers the same way."""
    from models.presets.weights import quantize

    runtime, _ = compiled_runtime(tiny_model_dir, LoraLimits(max_rank=8, hotswap_rank=8))
    transformer = runtime.pipe.transformer
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        quantize(block, "int8")
    assert "Int8" in type(transformer.single_transformer_blocks[0].proj_mlp.weight).__name__
    plain = pixels(generate(runtime))
    styled = generate(runtime, loras=[LoraSpec("a", lora_file("a", seed=1))])
    assert any("hot-swapped into slot" in line for line in styled.log)
    assert np.abs(pixels(styled) - plain).max() > 2
    assert np.array_equal(pixels(generate(runtime)), plain)
