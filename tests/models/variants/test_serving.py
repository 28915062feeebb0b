"""One worker's variants under a GPU budget that holds one transformer (the code path a GPU runs,
on the CPU): every job's variant is swapped in, the images are those of a runtime that never
swaps, and the swaps are counted; a variant the worker does not serve is the client's error."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.loading import load_runtime
from models.request import GenerationRequest, VariantUnavailable
from models.runtime import FluxRuntime
from models.variants.serving import VariantOptions


@pytest.fixture(scope="module")
def one_at_a_time(tiny_model_dir: Path, variant_runtime: FluxRuntime) -> FluxRuntime:
    size = sum(t.numel() * t.element_size() for t in variant_runtime.pipe.transformer.parameters())
    options = VariantOptions(
        configured={"krea": "tiny", "fill": "tiny"},
        serve=["krea"],
        gpu_budget_bytes=size + size // 2,  # room for one transformer (with its buffers)
    )
    return load_runtime(
        "tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",), variants=options
    )


def request(variant: str) -> GenerationRequest:
    return GenerationRequest(prompt="a red cat", width=64, height=64, seed=9, steps=2, variant=variant)


def test_a_budget_for_one_swaps_every_change_and_changes_nothing(
    one_at_a_time: FluxRuntime, variant_runtime: FluxRuntime
) -> None:
    residency = one_at_a_time.residency
    assert residency is not None and residency.on_device() == ["dev"]
    expected = {v: variant_runtime.generate(request(v)).images[0].tobytes() for v in ("dev", "krea")}
    swaps = residency.stats.swaps
    for variant in ("krea", "dev", "krea"):
        generation = one_at_a_time.generate(request(variant))
        assert generation.images[0].tobytes() == expected[variant]
        assert generation.swap is not None and generation.swap.variant == variant
        assert any(line.startswith(f"Variant {variant} moved onto the device") for line in generation.log)
        assert residency.on_device() == [variant]
    assert residency.stats.swaps == swaps + 3
    assert one_at_a_time.generate(request("krea")).swap is None  # already there: no swap


def test_a_variant_this_worker_does_not_serve(one_at_a_time: FluxRuntime) -> None:
    unserved = r"not served by this worker \(FLUX_WORKER_VARIANTS\)"
    with pytest.raises(VariantUnavailable, match=unserved) as caught:
        one_at_a_time.generate(request("fill"))
    assert caught.value.variant == "fill"
    assert "fill" not in one_at_a_time.variants


def test_synthetic_variants_have_the_real_sizes_and_fills_width() -> None:
    """`--model synthetic` builds full-width random variants (here with one block of each kind)."""
    import torch

    from models.variants.load import load_variant_transformer
    from models.variants.spec import resolve_variants
    from models.weights.synthetic_spec import parse_synthetic

    model = "synthetic:layers=1,single_layers=1"
    specs = resolve_variants({"fill": "synthetic"}, model=model)
    fill = load_variant_transformer(
        specs["fill"],
        base_transformer=None,
        data_dir=Path("."),
        dtype=torch.bfloat16,
        synthetic=parse_synthetic(model),
    )
    assert (fill.config.in_channels, fill.config.out_channels, fill.x_embedder.in_features) == (384, 64, 384)
    assert fill.config.num_layers == 1 and fill.x_embedder.out_features == 3072
    assert fill.dtype == torch.bfloat16
