"""The torch-free half of `--model synthetic`: its name syntax and the FLUX.1 [dev] sizes.

`synthetic` or `synthetic:layers=N,single_layers=M,...` (see models/weights/synthetic.py for
what is built). The supervisor's preflight parses the name with this module alone, so it
imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

PREFIX = "synthetic"
MAX_LAYERS = 64

TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
T5 = dict(
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_heads=64,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
CLIP = dict(
    hidden_size=768,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=768,
    hidden_act="quick_gelu",
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# The redux image encoder: SigLIP so400m at 384 px, patch 14 (what FLUX.1 Redux uses).
SIGLIP = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)


@dataclass(frozen=True)
class SyntheticSpec:
    """Block counts of a synthetic model; the defaults are FLUX.1 [dev]'s."""

    layers: int = 19
    single_layers: int = 38
    t5_layers: int = 24
    clip_layers: int = 12
    siglip_layers: int = 27

    @property
    def name(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) != f.default
        ]
        return PREFIX + (":" + ",".join(changed) if changed else "")

    def transformer_config(self) -> dict[str, Any]:
        return {**TRANSFORMER, "num_layers": self.layers, "num_single_layers": self.single_layers}


def is_synthetic(model: str) -> bool:
    return model == PREFIX or model.startswith(PREFIX + ":")


def parse_synthetic(model: str) -> SyntheticSpec:
    """`synthetic[:key=N,...]` -> SyntheticSpec; ValueError naming the bad part."""
    if not is_synthetic(model):
        raise ValueError(f"{model!r} is not a synthetic model name (synthetic[:key=N,...])")
    spec = SyntheticSpec()
    known = [f.name for f in fields(SyntheticSpec)]
    overrides = model[len(PREFIX) + 1 :]
    for item in filter(None, (part.strip() for part in overrides.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"synthetic override {item!r}: expected one of {', '.join(known)} as key=N")
        if not value.strip().isdigit() or not 1 <= int(value) <= MAX_LAYERS:
            raise ValueError(f"synthetic override {item!r}: the value must be a whole number 1..{MAX_LAYERS}")
        spec = replace(spec, **{key: int(value)})
    return spec
