"""The tuning pieces' torch side: what switches them on and off around one pipeline call.
What the pieces are, and when a machine cannot run one: models/presets/policy.py (`TUNING`);
PresetManager (models/presets/apply.py) uses what is here:

    why = attention_problem("_flash_3")            # None, or why diffusers cannot run it here
    with attention_backend(transformer, "_flash_3"), cuda_graph_steps(transformer, on=True):
        pipe(...)                                  # FA3 in every attention; one CUDA graph
                                                   # generation per transformer call
    decoder = CompiledDecoder(vae, compile_forward=...)
    with decoder.on():                             # vae.decoder runs compiled (eager after a
        vae.decode(latents)                        # compile failure, which it reports once)

The inductor flags, max-autotune, CUDA graphs and static shapes are torch.compile arguments
(`Preset.inductor_options`, `dynamic=not static_shapes`), given where the preset's blocks are
compiled (PresetManager._compile): torch applies `options=` inside that compile only, so the
process-wide inductor config is never changed (flux-fast sets it globally).

How CUDA graphs meet regional compile: each compiled block is its own CUDA graph (inductor's
CUDA graph trees; 57 per shape, replayed in a chain whose outputs feed the next block without a
copy). Trees free a graph's outputs when a new "generation" starts, and by default every call of
a compiled function is one, which would free block N's output while block N+1 reads it; so one
generation per transformer call is marked instead (`cuda_graph_steps`). With dynamic shapes
(the default) the Triton kernels are compiled once and a graph is recorded per new shape at its
first call (a warm-up per configured size records them); with static shapes each shape
compiles its own kernels too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_MISSING = object()


def attention_problem(name: str) -> str | None:
    """Why diffusers cannot run attention backend `name` in this process, or None.

    diffusers reports it in its own words: an unknown name is a ValueError, a backend whose
    package is missing or too old (flash_attn_3's `flash_attn_interface`, sageattention,
    xformers, kernels) a RuntimeError from `_check_attention_backend_requirements`. Backends
    fetched from the hub (`*_hub`) are refused: the server runs offline."""
    from diffusers.models.attention_dispatch import (
        AttentionBackendName,
        _check_attention_backend_requirements,
    )

    try:
        backend = AttentionBackendName(name)
    except ValueError:
        known = ", ".join(b.value for b in AttentionBackendName)
        return f"attention backend {name!r} is not one of diffusers' ({known})"
    if backend.value.endswith("_hub"):
        return f"attention backend {name!r} downloads its kernel from the hub, and the server runs offline"
    try:
        _check_attention_backend_requirements(backend)
    except RuntimeError as exc:
        return str(exc)
    return None


@contextmanager
def attention_backend(transformer: Any, name: str | None) -> Iterator[None]:
    """Every attention processor of `transformer` dispatches to backend `name` inside the block.

    diffusers' `set_attention_backend` does the same but also changes the process-wide default
    and keeps it; here only this transformer's processors change, and each gets back what it
    had. Compiled blocks guard on the processor's backend, so a preset without it (sharing the
    same compiled blocks) compiles its own graph rather than reusing this one."""
    if name is None:
        yield
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    backend = AttentionBackendName(name)
    processors = [
        module.processor
        for module in transformer.modules()
        if hasattr(getattr(module, "processor", None), "_attention_backend")
    ]
    before = [processor.__dict__.get("_attention_backend", _MISSING) for processor in processors]
    for processor in processors:
        processor._attention_backend = backend
    try:
        yield
    finally:
        for processor, previous in zip(reversed(processors), reversed(before), strict=True):
            if previous is _MISSING:
                processor.__dict__.pop("_attention_backend", None)  # back to the class's None
            else:
                processor._attention_backend = previous


@contextmanager
def cuda_graph_steps(transformer: Any, *, on: bool) -> Iterator[None]:
    """With CUDA graphs on: a new CUDA graph tree generation at every transformer call, so the
    57 compiled blocks of one call are one chain (see the module's docstring). The marker only
    counts; a CPU runs it as well."""
    if not on:
        yield
        return
    import torch

    def new_generation(_module: Any, _args: Any) -> None:
        torch.compiler.cudagraph_mark_step_begin()

    handle = transformer.register_forward_pre_hook(new_generation)
    try:
        yield
    finally:
        handle.remove()


class CompiledDecoder:
    """The VAE's decoder compiled (flux-fast compiles `vae.decode`; the decoder module is the
    same work, and tiled decoding reaches it too), switched on per call.

    A compile failure (a missing compiler, an inductor bug at one shape) must not fail the
    image: that call decodes eagerly, `failure` says why from then on and the decoder stays
    eager (PresetManager adds it to the note of every preset that has the piece)."""

    def __init__(self, vae: Any, compile_forward: Callable[[Any], Any]) -> None:
        from models.presets.compiling import failure_summary, is_compile_failure

        self.decoder = vae.decoder
        self.failure: str | None = None
        compiled = compile_forward(self.decoder.forward)
        eager = type(self.decoder).forward.__get__(self.decoder)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.failure is None:
                try:
                    return compiled(*args, **kwargs)
                except Exception as exc:
                    if not is_compile_failure(exc):
                        raise
                    self.failure = f"VAE decode compile failed ({failure_summary(exc)}); decoded eager"
                    log.warning("%s", self.failure, exc_info=exc)
            return eager(*args, **kwargs)

        self._forward = forward

    @contextmanager
    def on(self, enabled: bool = True) -> Iterator[None]:
        if not enabled:
            yield
            return
        self.decoder.forward = self._forward
        try:
            yield
        finally:
            self.decoder.__dict__.pop("forward", None)  # back to the class's eager forward
