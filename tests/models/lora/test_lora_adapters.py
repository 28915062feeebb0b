"""LoRAs on the eager tiny runtime: layouts, scales, isolation, the in-memory LRU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models.loading import load_runtime
from models.lora import LoraError, LoraLimits, LoraSpec
from models.lora.manager import LoraManager
from models.lora.named import NamedAdapters
from models.request import InputError
from models.runtime import FluxRuntime
from tests.models.lora.helpers import generate, png


def image_bytes(runtime: FluxRuntime, *loras: LoraSpec, **job_fields: object) -> bytes:
    out = generate(runtime, **job_fields, loras=loras)
    return png(out.images[0])


@pytest.fixture(scope="module")
def base(lora_runtime: FluxRuntime) -> bytes:
    """The image without LoRA, taken before any LoRA test of this module ran."""
    return image_bytes(lora_runtime)


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "xlabs"])
def test_each_layout_changes_the_image_and_leaves_no_trace(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path], base: bytes, layout: str
) -> None:
    spec = LoraSpec(layout, lora_file(layout, layout=layout, seed=11))
    with_lora = image_bytes(lora_runtime, spec)
    assert with_lora != base
    assert image_bytes(lora_runtime) == base  # the next plain request: byte-identical


def test_scale_zero_is_the_base_image(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path], base: bytes
) -> None:
    assert image_bytes(lora_runtime, LoraSpec("a", lora_file("a", seed=1), scale=0.0)) == base


def test_two_loras_at_half_differ_from_either_alone(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path], base: bytes
) -> None:
    a, b = lora_file("a", seed=1), lora_file("b", seed=2)
    only_a = image_bytes(lora_runtime, LoraSpec("a", a))
    only_b = image_bytes(lora_runtime, LoraSpec("b", b))
    both = image_bytes(lora_runtime, LoraSpec("a", a, 0.5), LoraSpec("b", b, 0.5))
    assert len({base, only_a, only_b, both}) == 4
    assert image_bytes(lora_runtime, LoraSpec("a", a)) == only_a  # repeatable


def test_the_same_lora_twice_adds_its_scales(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path]
) -> None:
    a = lora_file("a", seed=1)
    once = image_bytes(lora_runtime, LoraSpec("a", a, 1.0))
    twice = image_bytes(lora_runtime, LoraSpec("a", a, 0.5), LoraSpec("a again", a, 0.5))
    assert once == twice


def test_a_repeated_lora_is_not_loaded_again(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path]
) -> None:
    spec = LoraSpec("c", lora_file("c", seed=3))
    first = generate(lora_runtime, loras=[spec])
    again = generate(lora_runtime, loras=[spec])
    assert any("loaded as adapter" in line for line in first.log)
    assert any("already loaded" in line for line in again.log)
    assert any("1 hit(s), 0 miss(es) this request" in line for line in again.log)
    assert png(first.images[0]) == png(again.images[0])


def test_text_encoder_lora_does_not_leak_into_the_next_request(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path], base: bytes
) -> None:
    plain = LoraSpec("d", lora_file("d", seed=4))
    before = image_bytes(lora_runtime, plain)
    with_te = LoraSpec("te", lora_file("te", seed=5, text_encoder=True))
    te_image = image_bytes(lora_runtime, with_te)
    assert te_image not in (before, base)
    assert image_bytes(lora_runtime, plain) == before
    assert image_bytes(lora_runtime) == base


def test_image_to_image_uses_the_loras(lora_runtime: FluxRuntime, lora_file: Callable[..., Path]) -> None:
    source = png(generate(lora_runtime, seed=3).images[0])
    fields = {"task": "image-to-image", "image": source, "strength": 0.8}
    plain = image_bytes(lora_runtime, **fields)
    styled = image_bytes(lora_runtime, LoraSpec("a", lora_file("a", seed=1)), **fields)
    assert plain != styled
    assert image_bytes(lora_runtime, **fields) == plain


def test_a_bad_lora_fails_its_request_and_the_next_one_is_clean(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path], base: bytes, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"this is not a LoRA at all")
    good = LoraSpec("a", lora_file("a", seed=1))
    with pytest.raises(LoraError, match=r"LoRA 'https://lan/broken.safetensors': is not a safetensors file"):
        generate(lora_runtime, loras=[good, LoraSpec("https://lan/broken.safetensors", broken)])
    assert image_bytes(lora_runtime) == base


def test_least_recently_used_adapters_are_unloaded(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path]
) -> None:
    manager = LoraManager(lora_runtime.pipe, limits=LoraLimits(max_loaded=2), compiled=False)
    saved = lora_runtime.loras
    lora_runtime.loras = manager
    try:
        files = [lora_file(f"lru{i}", seed=20 + i) for i in range(3)]
        for i, file in enumerate(files):
            generate(lora_runtime, loras=[LoraSpec(f"lru{i}", file)])
        assert manager.loaded() == [str(files[1].resolve()), str(files[2].resolve())]
        # lru1 used again: now lru2 is the oldest, and reloading lru0 pushes it out.
        generate(lora_runtime, loras=[LoraSpec("lru1", files[1])])
        out = generate(lora_runtime, loras=[LoraSpec("lru0", files[0])])
        assert any("loaded as adapter" in line for line in out.log)
        assert manager.loaded() == [str(files[1].resolve()), str(files[0].resolve())]
        adapters = lora_runtime.pipe.get_list_adapters()["transformer"]
        assert len([a for a in adapters if a.startswith("lora_")]) >= 2
        assert (manager.stats.hits, manager.stats.misses) == (1, 4)
    finally:
        lora_runtime.loras = saved
        assert isinstance(manager.strategy, NamedAdapters)
        manager.strategy.unload_all()


def test_output_is_close_to_merging_the_lora_into_the_weights(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path]
) -> None:
    """The adapter computes W + scale * B @ A: merging that by hand gives the same image."""
    import torch
    from safetensors.torch import load_file

    path = lora_file("a", seed=1)
    styled = np.asarray(generate(lora_runtime, loras=[LoraSpec("a", path, 0.7)]).images[0], float)
    transformer = lora_runtime.pipe.transformer
    tensors = load_file(str(path))
    saved: dict[str, torch.Tensor] = {}
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for key, down in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            layer = getattr(modules[name], "base_layer", modules[name])
            saved[name] = layer.weight.clone()
            layer.weight += 0.7 * tensors[key.replace("lora_A", "lora_B")] @ down
    try:
        merged = np.asarray(generate(lora_runtime).images[0], float)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                getattr(modules[name], "base_layer", modules[name]).weight.copy_(weight)
    assert np.abs(styled - merged).max() <= 2  # 8-bit pixels; float rounding only


def test_a_quantized_preset_runs_loras_on_the_loaded_weights_and_says_so(
    lora_runtime: FluxRuntime, lora_file: Callable[..., Path], tiny_model_dir: Path
) -> None:
    from models.presets.apply import PresetManager
    from models.presets.policy import Hardware, Preset

    spec = LoraSpec("a", lora_file("a", seed=1))
    eager = generate(lora_runtime, loras=[spec])
    saved = lora_runtime.presets
    lora_runtime.presets = PresetManager(
        lora_runtime.pipe.transformer,
        device="cpu",
        enabled=["none", "regular"],
        data_dir=tiny_model_dir.parent,
        presets={"none": Preset("none"), "regular": Preset("regular", precision="int8")},
        hardware=Hardware("cpu", None, torchao=True, compiler=True),
    )
    try:
        quantized_plain = generate(lora_runtime, acceleration="regular")
        out = generate(lora_runtime, acceleration="regular", loras=[spec])
    finally:
        lora_runtime.presets = saved
    assert quantized_plain.preset_note is None
    assert out.preset == "regular"
    assert out.preset_note == "LoRAs apply to the weights as loaded: ran without int8 weights"
    assert png(out.images[0]) == png(eager.images[0])


def test_inpainting_with_a_lora(lora_runtime: FluxRuntime, lora_file: Callable[..., Path]) -> None:
    from PIL import Image

    source = png(generate(lora_runtime, seed=3, width=96, height=64).images[0])
    mask = Image.new("RGB", (96, 64))
    mask.paste((255, 255, 255), (48, 0, 96, 64))  # repaint the right half only
    fields = {"task": "inpainting", "image": source, "mask": png(mask), "strength": 0.9}
    fields |= {"width": 96, "height": 64}
    plain = generate(lora_runtime, **fields)
    styled = generate(lora_runtime, **fields, loras=[LoraSpec("a", lora_file("a", seed=1))])
    assert plain.images[0].size == (96, 64)
    assert png(plain.images[0]) != png(styled.images[0])
    assert png(generate(lora_runtime, **fields).images[0]) == png(plain.images[0])
    with pytest.raises(InputError, match="needs a mask"):
        generate(lora_runtime, **{**fields, "mask": None})


@pytest.mark.parametrize("hotswap", [False, True], ids=["adapters", "hotswap"])
def test_loras_on_fp8_stored_weights(
    tiny_model_dir: Path, lora_file: Callable[..., Path], hotswap: bool
) -> None:
    """The fp8-storage memory plans keep the blocks' linear weights in float8, cast a block at
    a time: adapters must still compute in the model's dtype."""
    from models.memory import store_blocks_in_fp8

    runtime = load_runtime("tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",))
    assert store_blocks_in_fp8(runtime.pipe.transformer) > 0
    limits = LoraLimits(max_rank=8, hotswap="eager", hotswap_rank=8)
    runtime.loras = LoraManager(runtime.pipe, limits=limits, compiled=hotswap)
    runtime.loras.prepare()
    plain = png(generate(runtime).images[0])
    styled = png(generate(runtime, loras=[LoraSpec("a", lora_file("a", seed=1))]).images[0])
    assert styled != plain
    assert png(generate(runtime).images[0]) == plain
