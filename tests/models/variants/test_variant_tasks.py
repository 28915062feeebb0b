"""Every variant task through the runtime, on the tiny variants `--model tiny` serves: the real
diffusers Fill and Kontext pipelines on the base's shared encoders and VAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from models.lora.spec import LoraSpec
from models.lora.tiny_loras import write_lora
from models.request import GenerationRequest, TaskUnavailable, VariantUnavailable
from models.runtime import FluxRuntime, Generation
from models.variants.spec import DEFAULT_TINY_VARIANTS, TINY_FINETUNE
from tests.models.variants.conftest import box_mask, pattern, png

MASK_BOX = (16, 16, 48, 48)


def run(runtime: FluxRuntime, **fields: Any) -> Generation:
    defaults = {"width": 64, "height": 64, "prompt": "a red cat", "steps": 2, "seed": 5}
    return runtime.generate(GenerationRequest(**{**defaults, **fields}))


def pixels(generation: Generation) -> bytes:
    return generation.images[0].tobytes()


def fill(runtime: FluxRuntime, size: tuple[int, int] = (64, 64), **fields: Any) -> Generation:
    inputs = {"image": png(pattern(*size)), "mask": png(box_mask(*size, MASK_BOX))}
    return run(runtime, **{"variant": "fill", "task": "fill", "guidance": 30.0, **inputs, **fields})


def test_tiny_serves_every_variant_and_each_computes_its_own_image(variant_runtime: FluxRuntime) -> None:
    assert set(variant_runtime.variants) == {"dev", *DEFAULT_TINY_VARIANTS}
    images = {
        name: pixels(run(variant_runtime, variant=name)) for name in ("dev", "krea", "kontext", TINY_FINETUNE)
    }
    assert len(set(images.values())) == 4  # four transformers, four images
    assert pixels(run(variant_runtime, variant="krea")) == images["krea"]  # and each is deterministic
    assert run(variant_runtime, variant="krea").variant == "krea"


def test_dev_tasks_run_on_a_fine_tune(variant_runtime: FluxRuntime) -> None:
    image = png(pattern(64, 64))
    i2i = run(variant_runtime, variant="krea", task="image-to-image", image=image, strength=0.6)
    inpaint = run(
        variant_runtime, variant="krea", task="inpainting", image=image, mask=png(box_mask(64, 64, MASK_BOX))
    )
    redux = run(variant_runtime, variant=TINY_FINETUNE, task="redux", image=image)
    assert [g.images[0].size for g in (i2i, inpaint, redux)] == [(64, 64)] * 3
    assert pixels(i2i) != pixels(run(variant_runtime, task="image-to-image", image=image, strength=0.6))


def test_fill_pastes_back_the_unmasked_pixels(variant_runtime: FluxRuntime) -> None:
    original = pattern(64, 64)
    pasted = fill(variant_runtime).images[0]
    raw = fill(variant_runtime, paste_back=False).images[0]
    assert pasted.size == raw.size == (64, 64)
    outside = [(x, y) for x in range(64) for y in range(64) if not (16 <= x < 48 and 16 <= y < 48)]
    assert all(pasted.getpixel(p) == original.getpixel(p) for p in outside)
    assert any(raw.getpixel(p) != original.getpixel(p) for p in outside)
    assert pasted.getpixel((30, 30)) == raw.getpixel((30, 30))  # inside: the model's pixels


def test_fill_resizes_to_the_original_only_when_asked(variant_runtime: FluxRuntime) -> None:
    assert fill(variant_runtime, size=(72, 70)).images[0].size == (80, 64)  # worked at a multiple of 16
    assert fill(variant_runtime, size=(72, 70), resize_to_original=True).images[0].size == (72, 70)


def test_kontext_edits_match_the_input_size_by_default(variant_runtime: FluxRuntime) -> None:
    image = png(pattern(96, 64))
    edit = run(variant_runtime, variant="kontext", task="edit", image=image, guidance=2.5)
    assert edit.images[0].size == (96, 64)
    other = run(
        variant_runtime, variant="kontext", task="edit", image=png(pattern(96, 64).rotate(180)), guidance=2.5
    )
    assert pixels(other) != pixels(edit)  # the input image conditions the output


def test_kontext_auto_resolution(variant_runtime: FluxRuntime) -> None:
    # One ~1 MP run (20 s on 2 busy cores); every mode's size: test_sizes.py.
    edit = run(
        variant_runtime,
        variant="kontext",
        task="edit",
        image=png(pattern(96, 64)),
        resolution_mode="auto",
        steps=1,
    )
    assert edit.images[0].size == (1248, 832)


def test_kontext_inpaints_with_a_reference(variant_runtime: FluxRuntime) -> None:
    fields = {
        "variant": "kontext",
        "task": "edit-inpainting",
        "image": png(pattern(64, 64)),
        "mask": png(box_mask(64, 64, MASK_BOX)),
        "strength": 0.88,
    }
    red = run(variant_runtime, reference_image=png(Image.new("RGB", (48, 48), (255, 0, 0))), **fields)
    blue = run(variant_runtime, reference_image=png(Image.new("RGB", (48, 48), (0, 0, 255))), **fields)
    assert red.images[0].size == (64, 64)
    assert pixels(red) != pixels(blue)  # the reference conditions the result


def test_a_variant_this_server_lacks_is_the_clients_error(variant_runtime: FluxRuntime) -> None:
    with pytest.raises(
        VariantUnavailable, match=r"variant 'schnell' is not configured.*--variant schnell=PATH"
    ):
        run(variant_runtime, variant="schnell")
    with pytest.raises(TaskUnavailable, match="variant 'fill' does not run 'text-to-image'"):
        run(variant_runtime, variant="fill")
    with pytest.raises(TaskUnavailable, match="variant 'dev' does not run 'fill'"):
        fill(variant_runtime, variant="dev")


@pytest.mark.parametrize("variant", ["kontext", "krea", "fill"])
def test_loras_on_every_variant(variant_runtime: FluxRuntime, variant: str, tmp_path: Path) -> None:
    transformer = variant_runtime.variants[variant].transformer
    lora = LoraSpec(
        "style", write_lora(tmp_path / "style.safetensors", transformer, seed=3, strength=2.0), 1.0
    )

    def go(**fields: Any) -> bytes:
        if variant == "fill":
            return pixels(fill(variant_runtime, paste_back=False, **fields))
        return pixels(run(variant_runtime, variant=variant, **fields))

    before = go()
    assert go(loras=(lora,)) != before
    assert go() == before  # the LoRA was on for that request only
