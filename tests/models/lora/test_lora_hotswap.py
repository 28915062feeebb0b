"""Hot-swap on a compiled preset (CPU, dynamo with a counting backend): no recompiles.

A private runtime whose "regular" preset is a regional compile on the loaded weights, compiled
through `torch._dynamo.testing.CompileCounter` (counts every graph dynamo hands to a backend,
runs it eagerly: seconds, not minutes, on 2 cores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models.loading import load_runtime
from models.lora import LoraLimits, LoraSpec
from models.lora.manager import LoraManager
from models.presets.apply import PresetManager
from models.presets.policy import Hardware, Preset
from models.runtime import FluxRuntime
from tests.models.lora.helpers import generate, png

CPU = Hardware("cpu", None, torchao=True, compiler=True)
# Slots made at load on every linear layer (lora_hotswap=eager), rank 8 (the test LoRAs' most).
SLOTS_AT_LOAD = LoraLimits(max_rank=8, max_per_request=2, hotswap="eager", hotswap_rank=8)


@pytest.fixture(scope="module")
def compiled(tiny_model_dir: Path) -> Iterator[tuple[FluxRuntime, torch._dynamo.testing.CompileCounter]]:
    from torch._dynamo.testing import CompileCounter

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
    runtime.loras = LoraManager(runtime.pipe, limits=SLOTS_AT_LOAD, compiled=True)
    runtime.loras.prepare()
    yield runtime, counter
    torch._dynamo.reset()


def run(runtime: FluxRuntime, *loras: LoraSpec, acceleration: str = "regular") -> tuple[bytes, list[str]]:
    out = generate(runtime, acceleration=acceleration, loras=loras)
    assert out.preset == acceleration
    return png(out.images[0]), out.log


def test_switching_cached_loras_does_not_recompile(
    compiled: tuple[FluxRuntime, object], lora_file: Callable[..., Path]
) -> None:
    runtime, counter = compiled
    a = LoraSpec("a", lora_file("a", seed=1))
    b = LoraSpec("b", lora_file("b", seed=2))
    k = LoraSpec("k", lora_file("kohya", layout="kohya", seed=11))
    low = LoraSpec("low", lora_file("rank2", seed=9, rank=2))

    base, _ = run(runtime)
    first_a, log = run(runtime, a)
    assert any("hot-swapped into slot" in line for line in log)
    for spec in (b, k, low):  # one first load each, then all of them are cached
        run(runtime, spec)
    graphs = counter.frame_count
    assert graphs > 0

    images = {}
    for spec in (a, b, k, low, a):
        images[spec.name], _ = run(runtime, spec)
    images["a+b"], _ = run(runtime, LoraSpec("a", a.file, 0.5), LoraSpec("b", b.file, 0.5))
    images["a0"], _ = run(runtime, LoraSpec("a", a.file, 0.0))
    again, _ = run(runtime)
    assert counter.frame_count == graphs, "switching between cached LoRAs recompiled"

    assert images["a"] == first_a
    assert len({base, images["a"], images["b"], images["k"], images["low"], images["a+b"]}) == 6
    assert images["a0"] == base  # scale 0 adds exact zeros
    assert again == base


def test_hot_swapped_lora_matches_the_plain_adapter(
    compiled: tuple[FluxRuntime, object], lora_runtime: FluxRuntime, lora_file: Callable[..., Path]
) -> None:
    runtime, _ = compiled
    spec = LoraSpec("a", lora_file("a", seed=1), 0.8)
    swapped = np.asarray(_decode(run(runtime, spec)[0]), float)
    plain = np.asarray(generate(lora_runtime, loras=[spec]).images[0], float)
    assert np.abs(swapped - plain).max() <= 2


def test_a_text_encoder_lora_takes_the_slower_path_and_leaves_the_graphs_alone(
    compiled: tuple[FluxRuntime, object], lora_file: Callable[..., Path]
) -> None:
    runtime, counter = compiled
    a = LoraSpec("a", lora_file("a", seed=1))
    cached_a, _ = run(runtime, a)
    graphs = counter.frame_count
    te = LoraSpec("with-te", lora_file("te", seed=5, text_encoder=True))
    image, log = run(runtime, te)
    assert any("LoRA with-te adapts the text encoder" in line and "slower path" in line for line in log)
    assert image != cached_a
    assert run(runtime, a)[0] == cached_a
    assert counter.frame_count == graphs
    adapters = runtime.pipe.get_list_adapters()
    assert not any(name.startswith("eager_") for names in adapters.values() for name in names)


def _decode(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def test_warm_up_compiles_the_lora_graph_too(tiny_model_dir: Path, lora_file: Callable[..., Path]) -> None:
    """After `warmup`, the first LoRA request (and the first plain one) compiles nothing."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    runtime = load_runtime("tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",))
    runtime.presets = PresetManager(
        runtime.pipe.transformer,
        device="cpu",
        enabled=["regular"],
        data_dir=tiny_model_dir.parent,
        presets={"regular": Preset("regular", compile="regional")},
        compile_backend=counter,
        hardware=CPU,
    )
    runtime.loras = LoraManager(runtime.pipe, limits=SLOTS_AT_LOAD, compiled=True)
    runtime.loras.prepare()
    try:
        runtime.warmup([(64, 64)], max_images=1)  # one image: larger batches are the cold start test's
        graphs = counter.frame_count
        assert graphs > 0
        run(runtime, LoraSpec("a", lora_file("a", seed=1)))
        run(runtime, LoraSpec("b", lora_file("b", seed=2)), LoraSpec("a", lora_file("a", seed=1), 0.5))
        run(runtime)
        assert counter.frame_count == graphs
    finally:
        torch._dynamo.reset()
