"""Tiny random transformers for every variant of the family, beside the tiny base model.

`ensure_tiny_variants(data_dir)` builds, once, `data_dir / "tiny-flux-variants"` with one bare
transformer folder (config.json + safetensors, a few hundred KB) per kind:

- `fill/`: FLUX.1 Fill [dev]'s layout: input width 384 (64 latent + 64 masked-image latent +
  256 mask channels, with the tiny VAE's 16 latent channels and 8x downscale), output 64;
- `kontext/`, `krea/`, `finetune/`: FLUX.1 [dev]'s layout (Kontext and Krea share it).

Each has its own seed, so two variants never compute the same image: a test can tell which
variant ran. Same sizes as the tiny base (models/tiny.py), so they read its text embeddings.
The build is deterministic and safe with several processes at once (built aside, renamed in).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from models.tiny import TEXT_WIDTH
from models.variants.spec import FILL, FILL_IN_CHANNELS, KONTEXT, KREA

TINY_VARIANTS_DIRNAME = "tiny-flux-variants"
TINY_VARIANTS_VERSION = "1"
FINETUNE = "finetune"
_STAMP_FILE = "tiny-variants-build.json"
# folder -> (seed, input width); the base tiny transformer is seed 0.
_KINDS = {FILL: (10, FILL_IN_CHANNELS), KONTEXT: (11, 64), KREA: (12, 64), FINETUNE: (13, 64)}


def tiny_variant_folder(data_dir: Path, name: str) -> Path:
    """The tiny transformer folder a variant named `name` runs: its own kind for the family's
    names, the tiny fine-tune for any other name."""
    kind = name if name in _KINDS else FINETUNE
    return ensure_tiny_variants(data_dir) / kind


def tiny_transformer_config(in_channels: int) -> dict[str, object]:
    """The tiny base's transformer sizes (models/tiny.py), with this input width."""
    return dict(
        patch_size=1,
        in_channels=in_channels,
        out_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def _build_into(root: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    for kind, (seed, in_channels) in _KINDS.items():
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(**tiny_transformer_config(in_channels))  # type: ignore[arg-type]
        model.save_pretrained(root / kind, safe_serialization=True)
    stamp = {"builder": "flux-server models.variants.tiny", "version": TINY_VARIANTS_VERSION}
    (root / _STAMP_FILE).write_text(json.dumps(stamp, sort_keys=True) + "\n")


def _is_current(folder: Path) -> bool:
    try:
        stamp = json.loads((folder / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("version") == TINY_VARIANTS_VERSION


def ensure_tiny_variants(data_dir: Path) -> Path:
    """`data_dir / "tiny-flux-variants"`, built first when missing or outdated."""
    data_dir = Path(data_dir)
    target = data_dir / TINY_VARIANTS_DIRNAME
    if _is_current(target):
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_VARIANTS_DIRNAME}-build-", dir=data_dir))
    try:
        _build_into(staging)
        if target.exists() and not _is_current(target):
            stale = Path(tempfile.mkdtemp(prefix=f".{TINY_VARIANTS_DIRNAME}-stale-", dir=data_dir))
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, stale / TINY_VARIANTS_DIRNAME)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not _is_current(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
