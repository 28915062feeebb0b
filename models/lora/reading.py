"""Reading and checking one LoRA file before anything touches the shared pipeline.

`read_lora(spec, transformer=..., text_encoder=..., limits=..., dtype=...)` returns a
`LoadedLora`: the tensors in diffusers' PEFT layout (whatever layout the file used: diffusers'
converters read kohya, XLabs and the rest), alphas folded into the weights, on the CPU in the
model's dtype. Every problem is a `LoraError` naming the LoRA: too large, not safetensors, not
a FLUX LoRA, layers or shapes this model does not have, a rank above the limit.

Checking first matters: diffusers would otherwise widen the transformer's own weights for a
LoRA with larger shapes (Control LoRAs), or load nothing at all for keys it does not
recognise, both silently.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.lora.errors import LoraError
from models.lora.spec import LoraLimits, LoraSpec, file_key

if TYPE_CHECKING:
    import torch

# Components a FLUX LoRA may adapt (diffusers' FluxLoraLoaderMixin loads exactly these).
COMPONENTS = ("transformer", "text_encoder")
_KEY = re.compile(r"^(transformer|text_encoder)\.(.+)\.lora_(A|B)\.weight$")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class LoadedLora:
    key: tuple[str, int, int]
    name: str
    state_dict: dict[str, torch.Tensor]  # "transformer.<module>.lora_A.weight", ...
    rank: int
    nbytes: int

    @property
    def targets(self) -> frozenset[str]:
        """The adapted layers, as "<component>.<module>"."""
        return frozenset(k.rsplit(".lora_", 1)[0] for k in self.state_dict)

    @property
    def has_text_encoder(self) -> bool:
        return any(k.startswith("text_encoder.") for k in self.state_dict)


def linear_dims(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer of `module` -> (in_features, out_features). A layer that already
    carries adapters (peft wraps it) counts as its base layer, under its own name."""
    import torch

    dims: dict[str, tuple[int, int]] = {}
    wrapped: list[str] = []
    for name, layer in module.named_modules():
        if any(name.startswith(f"{w}.") for w in wrapped):
            continue
        base = getattr(layer, "base_layer", None)
        if isinstance(base, torch.nn.Linear):
            wrapped.append(name)
            layer = base
        if isinstance(layer, torch.nn.Linear):
            dims[name] = (layer.in_features, layer.out_features)
    return dims


def check_safetensors_header(spec: LoraSpec, size: int) -> None:
    """A safetensors file starts with an 8-byte little-endian length and that much JSON."""
    not_safetensors = LoraError(spec.name, "is not a safetensors file")
    if size < 8:
        raise not_safetensors
    with open(spec.file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if not 2 <= length <= min(size - 8, _MAX_HEADER_BYTES):
            raise not_safetensors
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            raise not_safetensors from None
    if not isinstance(header, dict):
        raise not_safetensors


def read_lora(
    spec: LoraSpec,
    *,
    transformer: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    limits: LoraLimits,
    dtype: torch.dtype,
) -> LoadedLora:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    key = file_key(spec)
    size = key[1]
    if size > limits.max_file_bytes:
        raise LoraError(
            spec.name, f"is {_mb(size)}, above this server's limit of {_mb(limits.max_file_bytes)} per LoRA"
        )
    check_safetensors_header(spec, size)
    try:
        tensors = load_file(str(spec.file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(spec.name, f"is not a readable safetensors file ({exc})") from exc
    if not tensors:
        raise LoraError(spec.name, "holds no tensors")

    state_dict = _to_diffusers_layout(spec, tensors, transformer)
    dims = {"transformer": linear_dims(transformer)}
    if text_encoder is not None:
        dims["text_encoder"] = linear_dims(text_encoder)
    rank = _check_shapes(spec, state_dict, dims)
    if rank > limits.max_rank:
        raise LoraError(spec.name, f"has rank {rank}, above this server's limit of {limits.max_rank}")
    prepared = {}
    for name, tensor in state_dict.items():
        if not torch.isfinite(tensor).all():
            raise LoraError(spec.name, f"contains NaN or infinite values ({name})")
        prepared[name] = _pad_rank(name, tensor, rank).to(dtype=dtype).contiguous()
    nbytes = sum(t.numel() * t.element_size() for t in prepared.values())
    return LoadedLora(key=key, name=spec.name, state_dict=prepared, rank=rank, nbytes=nbytes)


def _to_diffusers_layout(
    spec: LoraSpec, tensors: dict[str, torch.Tensor], transformer: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """diffusers' own FLUX converters, then alphas folded into lora_A (so every adapter has the
    plain alpha == rank scaling, which hot-swapping needs)."""
    import torch
    from diffusers import FluxPipeline

    if not all(t.is_floating_point() for t in tensors.values()):
        raise LoraError(spec.name, "is not a LoRA: it holds non-float tensors")
    # A PEFT file saved from the transformer alone has no "transformer." prefix.
    top_level = {name for name, _ in transformer.named_children()}
    if all(k.split(".", 1)[0] in top_level for k in tensors):
        tensors = {f"transformer.{k}": v for k, v in tensors.items()}
    try:
        state_dict, alphas = FluxPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    except Exception as exc:  # the converters assert and raise anything on foreign layouts
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise LoraError(spec.name, f"is not a FLUX LoRA this server can read ({detail})") from exc
    state_dict = dict(state_dict)
    for alpha_key, alpha in (alphas or {}).items():
        module = alpha_key.removesuffix(".alpha")
        down_key = f"{module}.lora_A.weight"
        if down_key not in state_dict:
            raise LoraError(spec.name, f"has an alpha for a layer it does not adapt ({alpha_key})")
        down = state_dict[down_key]
        state_dict[down_key] = down * (float(torch.as_tensor(alpha)) / down.shape[0])
    return state_dict


def _check_shapes(
    spec: LoraSpec, state_dict: dict[str, torch.Tensor], dims: dict[str, dict[str, tuple[int, int]]]
) -> int:
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        match = _KEY.match(name)
        if match is None:
            raise LoraError(
                spec.name, f"has a tensor this server cannot apply: {name!r} (only LoRA A/B weights)"
            )
        component, module, which = match.groups()
        if component not in dims:
            raise LoraError(spec.name, f"adapts the {component}, which this model does not have")
        if module not in dims[component]:
            raise LoraError(
                spec.name,
                f"does not fit this model: it adapts {component} layer {module!r}, which does not exist",
            )
        if tensor.dim() != 2:
            raise LoraError(
                spec.name, f"does not fit this model: {name} has {tensor.dim()} dimensions, not 2"
            )
        pairs.setdefault((component, module), {})[which] = tensor
    if not pairs:
        raise LoraError(spec.name, "adapts no layer")
    rank = 0
    for (component, module), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise LoraError(spec.name, f"has only half of the LoRA for {component} layer {module!r}")
        fan_in, fan_out = dims[component][module]
        down, up = pair["A"], pair["B"]
        r = down.shape[0]
        if down.shape[1] != fan_in or up.shape[0] != fan_out or up.shape[1] != r:
            raise LoraError(
                spec.name,
                f"does not fit this model: {component} layer {module!r} is {fan_in}->{fan_out}, the LoRA's "
                f"matrices are {list(down.shape)} and {list(up.shape)}",
            )
        rank = max(rank, r)
    return rank


def _pad_rank(name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """Zero-pad a layer's A (rows) or B (columns) to the LoRA's largest rank: the same result,
    and one rank for every layer (peft then needs no per-layer rank or alpha patterns, which
    hot-swapping refuses)."""
    import torch.nn.functional as F

    if name.endswith(".lora_A.weight") and tensor.shape[0] < rank:
        return F.pad(tensor, (0, 0, 0, rank - tensor.shape[0]))
    if name.endswith(".lora_B.weight") and tensor.shape[1] < rank:
        return F.pad(tensor, (0, rank - tensor.shape[1]))
    return tensor


def _mb(size: int) -> str:
    return f"{size / 1024**2:.1f} MB"
