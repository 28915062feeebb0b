"""Key conversion between BFL's original FLUX transformer layout and diffusers' layout.

`flux1-dev.safetensors` (and most fine-tunes shared as one file) store the transformer in
BFL's layout: `double_blocks.N.img_attn.qkv.weight` holds q, k and v in one tensor,
`single_blocks.N.linear1.weight` holds q, k, v and the MLP input. diffusers'
`FluxTransformer2DModel` keeps them apart. diffusers ships a converter, but it hard-codes
FLUX's full hidden size, so it cannot convert the tiny test model; this one reads every size
from the tensors themselves. `diffusers_to_bfl` is the exact inverse, used to write fixtures.

Files may carry a `model.diffusion_model.` prefix (ComfyUI-style checkpoints, sometimes with
the VAE and text encoders in the same file); only the prefixed keys are the transformer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BFL_PREFIX = "model.diffusion_model."

# Modules renamed one to one; both `.weight` and `.bias` follow the module name.
_GLOBAL_MODULES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
# BFL's final modulation yields (shift, scale); diffusers' AdaLayerNormContinuous wants
# (scale, shift). Swapping the two halves is its own inverse.
_SWAPPED_MODULE = ("final_layer.adaLN_modulation.1", "norm_out.linear")

_DOUBLE_MODULES = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
# RMS norms: BFL calls the parameter `scale`, diffusers `weight`.
_DOUBLE_KEYS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
# Fused BFL projections split into equal parts along the output dimension.
_DOUBLE_SPLITS = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}

_SINGLE_MODULES = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_KEYS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
# linear1 = [q; k; v; mlp_in]: q, k and v are hidden-sized, the rest is the MLP.
_SINGLE_SPLIT = ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))

_PARAMS = ("weight", "bias")


def looks_like_bfl(keys: Iterable[str]) -> bool:
    return any(_strip(k).startswith("double_blocks.") for k in keys)


def looks_like_diffusers(keys: Iterable[str]) -> bool:
    return any(_strip(k).startswith("transformer_blocks.") for k in keys)


def _strip(key: str) -> str:
    return key[len(BFL_PREFIX) :] if key.startswith(BFL_PREFIX) else key


def strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `model.diffusion_model.`; when present, keys without it are not the transformer."""
    if any(k.startswith(BFL_PREFIX) for k in state_dict):
        return {k[len(BFL_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(BFL_PREFIX)}
    return dict(state_dict)


def _block_indices(keys: Iterable[str], block: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(block)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _renames(bfl_keys: Iterable[str] | None, diffusers_keys: Iterable[str] | None) -> list[tuple[str, str]]:
    """Every one-to-one (bfl_key, diffusers_key) pair, for the blocks present in either set."""
    keys = list(bfl_keys or []) + list(diffusers_keys or [])
    doubles = sorted(
        set(_block_indices(keys, "double_blocks")) | set(_block_indices(keys, "transformer_blocks"))
    )
    singles = sorted(
        set(_block_indices(keys, "single_blocks")) | set(_block_indices(keys, "single_transformer_blocks"))
    )
    pairs = [(f"{b}.{p}", f"{d}.{p}") for b, d in _GLOBAL_MODULES.items() for p in _PARAMS]
    for i in doubles:
        bfl, dif = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        pairs += [(f"{bfl}{b}.{p}", f"{dif}{d}.{p}") for b, d in _DOUBLE_MODULES.items() for p in _PARAMS]
        pairs += [(bfl + b, dif + d) for b, d in _DOUBLE_KEYS.items()]
    for i in singles:
        bfl, dif = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        pairs += [(f"{bfl}{b}.{p}", f"{dif}{d}.{p}") for b, d in _SINGLE_MODULES.items() for p in _PARAMS]
        pairs += [(bfl + b, dif + d) for b, d in _SINGLE_KEYS.items()]
    return pairs


def _splits(keys: Iterable[str]) -> list[tuple[str, tuple[str, ...], bool]]:
    """Every (bfl_key, diffusers_keys, is_single_linear1) fused parameter."""
    keys = list(keys)
    doubles = sorted(
        set(_block_indices(keys, "double_blocks")) | set(_block_indices(keys, "transformer_blocks"))
    )
    singles = sorted(
        set(_block_indices(keys, "single_blocks")) | set(_block_indices(keys, "single_transformer_blocks"))
    )
    out = []
    for i in doubles:
        for fused, parts in _DOUBLE_SPLITS.items():
            for p in _PARAMS:
                out.append(
                    (
                        f"double_blocks.{i}.{fused}.{p}",
                        tuple(f"transformer_blocks.{i}.{d}.{p}" for d in parts),
                        False,
                    )
                )
    fused, parts = _SINGLE_SPLIT
    for i in singles:
        for p in _PARAMS:
            out.append(
                (
                    f"single_blocks.{i}.{fused}.{p}",
                    tuple(f"single_transformer_blocks.{i}.{d}.{p}" for d in parts),
                    True,
                )
            )
    return out


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a BFL-layout transformer state dict (prefix optional) to diffusers' keys.

    Raises ValueError naming any key it does not recognise. Missing keys are left for
    `load_state_dict(strict=True)` to report.
    """
    import torch

    original = strip_prefix(state_dict)
    source = dict(original)
    out: dict[str, torch.Tensor] = {}
    for bfl_key, dif_key in _renames(source, None):
        if bfl_key in source:
            out[dif_key] = source.pop(bfl_key)
    for p in _PARAMS:
        bfl_key = f"{_SWAPPED_MODULE[0]}.{p}"
        if bfl_key in source:
            out[f"{_SWAPPED_MODULE[1]}.{p}"] = _swap_halves(source.pop(bfl_key))
    for bfl_key, dif_keys, is_linear1 in _splits(list(source)):
        if bfl_key not in source:
            continue
        fused = source.pop(bfl_key)
        if is_linear1:
            # linear1 maps hidden -> 3 * hidden + mlp: its weight's input width is the hidden size.
            weight_key = bfl_key.rsplit(".", 1)[0] + ".weight"
            if weight_key not in original:
                raise ValueError(f"{weight_key} is missing: cannot split {bfl_key}")
            hidden = original[weight_key].shape[1]
            sizes = [hidden, hidden, hidden, fused.shape[0] - 3 * hidden]
            pieces = torch.split(fused, sizes, dim=0)
        else:
            pieces = torch.chunk(fused, 3, dim=0)
        for key, piece in zip(dif_keys, pieces, strict=True):
            out[key] = piece.clone()
    if source:
        raise ValueError(f"unrecognised keys for a FLUX transformer in BFL layout: {sorted(source)[:5]}")
    return out


def diffusers_to_bfl(state_dict: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Convert diffusers' FluxTransformer2DModel keys to BFL's layout (the exact inverse)."""
    import torch

    source = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    for bfl_key, dif_key in _renames(None, source):
        if dif_key in source:
            out[bfl_key] = source.pop(dif_key)
    for p in _PARAMS:
        dif_key = f"{_SWAPPED_MODULE[1]}.{p}"
        if dif_key in source:
            out[f"{_SWAPPED_MODULE[0]}.{p}"] = _swap_halves(source.pop(dif_key))
    for bfl_key, dif_keys, _ in _splits(list(source)):
        if all(k in source for k in dif_keys):
            out[bfl_key] = torch.cat([source.pop(k) for k in dif_keys], dim=0)
    if source:
        raise ValueError(f"unrecognised keys for a diffusers FLUX transformer: {sorted(source)[:5]}")
    return {prefix + k: v for k, v in out.items()}
