"""Switching peft's LoRA layers per request, without peft's trainer-oriented side effects.

diffusers' `set_adapters` leaves a component that holds adapters but none of this request's
active with its previous ones, and turns hot-swap's tensor scalings back into floats (which
would recompile a compiled model). These two functions do exactly what a request needs:
`activate` gives every LoRA layer of the given modules exactly the request's adapters with their
scales; `deactivate` switches them all off, after which each layer computes its base layer
alone (the output is then bit-identical to a model that never had adapters).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def lora_layers(modules: Iterable[torch.nn.Module]) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [layer for module in modules for layer in module.modules() if isinstance(layer, LoraLayer)]


def activate(modules: Iterable[torch.nn.Module], scales: Mapping[str, float]) -> None:
    """Adapter name -> scale (the user's weight; alphas are already folded into the weights, so
    a layer's own scaling is 1 and the effective scaling is the user's scale)."""
    for layer in lora_layers(modules):
        present = [name for name in scales if name in layer.lora_A]
        if not present:
            layer.enable_adapters(False)
            continue
        layer.enable_adapters(True)
        layer.set_adapter(present, inference_mode=True)
        for name in present:
            current = layer.scaling[name]
            if hasattr(current, "fill_"):  # a hot-swap slot: keep the tensor (no recompile)
                current.fill_(scales[name])
            else:
                layer.scaling[name] = float(scales[name])


def deactivate(modules: Iterable[torch.nn.Module]) -> None:
    for layer in lora_layers(modules):
        layer.enable_adapters(False)
