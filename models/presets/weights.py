"""What a preset does to the weights: torchao quantization, fused QKV, a channels-last VAE.
Also used by the memory plans (models/memory.py quantizes the transformer's blocks to fp8)."""

from __future__ import annotations

from typing import Any


def quantize(transformer: Any, precision: str) -> None:
    """torchao dynamic-activation quantization of every linear layer, in place."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        PerRow,
        quantize_,
    )

    if precision == "fp8":
        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    elif precision == "int8":
        config = Int8DynamicActivationInt8WeightConfig()
    else:
        raise ValueError(f"unknown precision {precision!r}")
    quantize_(transformer, config)


def fuse_qkv_dropping_originals(transformer: Any) -> None:
    """Fuse Q/K/V (one wider GEMM) and drop the unfused copies, so each weight is held once."""
    transformer.fuse_qkv_projections()
    for module in transformer.modules():
        if getattr(module, "fused_projections", False):
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if name in module._modules:
                    del module._modules[name]


def set_vae_channels_last(vae: Any, channels_last: bool) -> None:
    """NHWC convolutions in the VAE (a small, lossless gain); converts only when it changes."""
    import torch

    wanted = torch.channels_last if channels_last else torch.contiguous_format
    if getattr(vae, "_flux_memory_format", torch.contiguous_format) != wanted:
        vae.to(memory_format=wanted)
        vae._flux_memory_format = wanted
