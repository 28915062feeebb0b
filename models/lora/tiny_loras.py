"""Random but deterministic LoRAs for the tiny model (models/tiny.py), for tests and benchmarks.

    write_lora(path, transformer, layout="diffusers" | "kohya" | "xlabs", seed=1, rank=4)

writes a safetensors file in one of the layouts diffusers' FLUX `load_lora_weights` reads:

- "diffusers": PEFT keys, `transformer.<module>.lora_A.weight` / `.lora_B.weight`;
- "kohya": sd-scripts keys, `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.alpha`
  (diffusers splits the fused qkv itself);
- "xlabs": XLabs' `double_blocks.0.processor.qkv_lora1.down.weight` attention LoRAs.

`text_encoder=clip` adds CLIP text-encoder layers (diffusers layout; a LoRA hot-swap cannot take).
The kohya single-block `linear1` (fused qkv + mlp) is left out: diffusers splits it with FLUX's
full widths, which the tiny model does not have. The weights are large enough (std `strength`)
to change the tiny model's image visibly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from models.lora.reading import linear_dims

if TYPE_CHECKING:
    import torch

Layout = Literal["diffusers", "kohya", "xlabs"]

# Diffusers module names -> kohya names (per double block i / single block i).
_KOHYA_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
_KOHYA_SINGLE = {"linear2": ("proj_out",), "modulation_lin": ("norm.linear",)}
_DEFAULT_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_out", "ff.net.2")


def write_lora(
    path: Path,
    transformer: torch.nn.Module,
    *,
    layout: Layout = "diffusers",
    seed: int = 1,
    rank: int = 4,
    strength: float = 0.5,
    text_encoder: torch.nn.Module | None = None,
    targets: tuple[str, ...] | None = None,
) -> Path:
    """Write a LoRA for `transformer` (and optionally a CLIP `text_encoder`) and return `path`.

    `targets` (diffusers layout only): module-name suffixes to adapt; default: attention
    projections, the single blocks' `proj_out` and the double blocks' feed-forward output."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)

    def pair(fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        down = torch.randn(rank, fan_in, generator=generator) * strength
        up = torch.randn(fan_out, rank, generator=generator) * strength
        return down.contiguous(), up.contiguous()

    dims = linear_dims(transformer)
    tensors: dict[str, torch.Tensor] = {}
    if layout == "diffusers":
        wanted = targets or _DEFAULT_TARGETS
        blocks = [n for n in dims if n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
        chosen = [n for n in blocks if n.endswith(wanted)] + [n for n in dims if n in wanted]
        for name in dict.fromkeys(chosen):
            down, up = pair(*dims[name])
            tensors[f"transformer.{name}.lora_A.weight"] = down
            tensors[f"transformer.{name}.lora_B.weight"] = up
    elif layout == "kohya":
        for prefix, table in (("double_blocks", _KOHYA_DOUBLE), ("single_blocks", _KOHYA_SINGLE)):
            module_prefix = "transformer_blocks" if prefix == "double_blocks" else "single_transformer_blocks"
            count = len({n.split(".")[1] for n in dims if n.startswith(f"{module_prefix}.")})
            for i in range(count):
                for kohya, parts in table.items():
                    fan_in = dims[f"{module_prefix}.{i}.{parts[0]}"][0]
                    fan_out = sum(dims[f"{module_prefix}.{i}.{p}"][1] for p in parts)
                    down, up = pair(fan_in, fan_out)
                    key = f"lora_unet_{prefix}_{i}_{kohya}"
                    tensors[f"{key}.lora_down.weight"] = down
                    tensors[f"{key}.lora_up.weight"] = up
                    tensors[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    elif layout == "xlabs":
        count = len({n.split(".")[1] for n in dims if n.startswith("transformer_blocks.")})
        for i in range(count):
            width = dims[f"transformer_blocks.{i}.attn.to_q"][0]
            for kind, fan_out in (("qkv_lora1", 3 * width), ("proj_lora1", width), ("qkv_lora2", 3 * width)):
                down, up = pair(width, fan_out)
                tensors[f"double_blocks.{i}.processor.{kind}.down.weight"] = down
                tensors[f"double_blocks.{i}.processor.{kind}.up.weight"] = up
    else:
        raise ValueError(f"unknown layout {layout!r}")

    if text_encoder is not None:
        if layout != "diffusers":
            raise ValueError("text-encoder layers are written in the diffusers layout only")
        te_dims = linear_dims(text_encoder)
        for name in [n for n in te_dims if n.endswith(("self_attn.q_proj", "self_attn.v_proj"))]:
            down, up = pair(*te_dims[name])
            tensors[f"text_encoder.{name}.lora_A.weight"] = down
            tensors[f"text_encoder.{name}.lora_B.weight"] = up

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
