"""Load one variant's transformer (torch): from its folder or single file, or build it (tiny,
synthetic). Everything else a variant runs with is the base's (models/variants/pipelines.py)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.variants.spec import VariantSpec, expected_in_channels
from models.weights.check import WeightsError

if TYPE_CHECKING:
    import torch

    from models.weights.synthetic_spec import SyntheticSpec


def load_variant_transformer(
    spec: VariantSpec,
    *,
    base_transformer: Any,
    data_dir: Path,
    dtype: torch.dtype,
    synthetic: SyntheticSpec | None = None,
) -> Any:
    """The variant's FluxTransformer2DModel on the CPU (synthetic: made there in `dtype`).

    `base_transformer`: the loaded base, whose config a single file is read with (only the
    input width differs: Fill's is read from the file's header)."""
    from diffusers import FluxTransformer2DModel

    local = {"local_files_only": True}
    if spec.source == "built" and spec.value == "tiny":
        from models.variants.tiny import tiny_variant_folder

        return FluxTransformer2DModel.from_pretrained(
            tiny_variant_folder(data_dir, spec.name), dtype=dtype, **local
        )
    if spec.source == "built":
        return _synthetic(spec, synthetic, dtype=dtype)
    assert spec.path is not None
    if spec.source == "folder":
        try:
            return FluxTransformer2DModel.from_pretrained(spec.path, dtype=dtype, **local).eval()
        except (OSError, ValueError) as exc:
            raise WeightsError(f"variant {spec.name!r}: cannot load {spec.path}: {exc}") from exc
    from models.variants.spec import single_file_in_channels
    from models.weights.load import load_single_file_transformer

    config = {**dict(base_transformer.config), "in_channels": single_file_in_channels(spec.path)}
    config["out_channels"] = base_transformer.config.out_channels or base_transformer.config.in_channels
    return load_single_file_transformer(spec.path, None, dtype=dtype, config=config)


def _synthetic(spec: VariantSpec, synthetic: SyntheticSpec | None, *, dtype: torch.dtype) -> Any:
    """FLUX.1 [dev]'s sizes (or the base's overrides) with random weights, seeded by the name,
    made on the CPU in `dtype` (the residency manager moves it)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from models.weights.synthetic import materialised_on
    from models.weights.synthetic_spec import SyntheticSpec

    config = (synthetic or SyntheticSpec()).transformer_config()
    config.update(in_channels=expected_in_channels(spec.architecture), out_channels=64)
    torch.manual_seed(zlib.crc32(spec.name.encode()))
    with materialised_on("cpu", dtype):
        return FluxTransformer2DModel(**config).eval()
