"""LoRA slots only when LoRAs are used (`lora_hotswap=lazy`, the default) on a compiled preset.

A private tiny runtime whose `regular` is a regional compile on the loaded weights, compiled
through `torch._dynamo.testing.CompileCounter` (counts graphs, runs them eagerly).
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
from models.runtime import FluxRuntime, Generation
from tests.models.lora.helpers import generate

CPU = Hardware("cpu", None, torchao=True, compiler=True)
# What a regional compile makes: one graph per block class (double, single), for batch 1 and
# for the larger batches (tests/models/test_compile_counts.py).
ONE_COMPILE = 4


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


def adapted_layers(file: Path) -> set[str]:
    with safe_open(str(file), "pt") as handle:
        return {key.removeprefix("transformer.").split(".lora_")[0] for key in handle.keys()}  # noqa: SIM118


def pixels(out: Generation) -> np.ndarray:
    return np.asarray(out.images[0], float)


def test_without_lora_requests_there_are_no_slots_and_one_compile(tiny_model_dir: Path) -> None:
    assert LoraLimits().hotswap == "lazy" and LoraLimits().hotswap_rank == 64  # the defaults
    runtime, counter = compiled_runtime(tiny_model_dir, LoraLimits())
    runtime.warmup([(64, 64)])
    assert slotted_layers(runtime) == set()
    assert counter.frame_count == ONE_COMPILE  # no second (slotted) compile at start
    for _ in range(2):
        assert generate(runtime, acceleration="regular").compiled.graphs == 0
    assert slotted_layers(runtime) == set()


def test_the_first_lora_request_makes_slots_on_its_layers_then_loras_hot_swap(
    tiny_model_dir: Path, lora_file: Callable[..., Path], lora_runtime: FluxRuntime
) -> None:
    limits = LoraLimits(max_rank=8, max_per_request=2, hotswap_rank=8)
    runtime, counter = compiled_runtime(tiny_model_dir, limits)
    runtime.warmup([(64, 64)])
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
    assert slotted_layers(runtime) == set()  # nothing slotted: the adapter was temporary


def test_hotswap_off_runs_lora_requests_eagerly_without_slots(
    tiny_model_dir: Path, lora_file: Callable[..., Path]
) -> None:
    runtime, counter = compiled_runtime(tiny_model_dir, LoraLimits(max_rank=8, hotswap="off"))
    runtime.warmup([(64, 64)])
    graphs = counter.frame_count
    out = generate(runtime, acceleration="regular", loras=[LoraSpec("a", lora_file("a", seed=1))])
    assert out.preset == "regular" and out.compiled.graphs == 0
    assert any("LoRA hot-swap is off" in line for line in out.log)
    assert counter.frame_count == graphs
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
