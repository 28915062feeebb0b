"""Applying the acceleration presets to a loaded transformer (torch, torchao, diffusers hooks).

How the runtime uses it (models/runtime.py):

    manager = PresetManager(transformer, device="cuda", enabled=["none", "regular", "high"],
                            data_dir=data_dir, memory_plan=plan)
    seconds = manager.warmup(pipe, sizes=[(1024, 1024), (1024, 768)])   # before "ready"
    with manager.use(pipe, requested="regular") as active:   # not re-entrant: hold a lock
        pipe(...)              # runs with the chosen transformer variant, compile and step cache
    active.name                # the preset that actually ran
    active.note                # why it differs from what was asked for, or None
    with manager.decoding(pipe.vae, active.preset):   # the preset's VAE decode (compiled or not)
        pipe.vae.decode(...)

What each preset is, and how one is adapted to the machine: models/presets/policy.py.

Weight sets: the manager keeps one transformer per distinct weight set (precision, fused QKV).
The base transformer is used as is; a quantized or fused variant is a deep copy that shares
nothing mutable with it. Compile is applied once per weight set and switched on and off per
call, so `none` and `regular` never share compiled state by accident. Under a memory plan that
keeps a single weight set (cards under ~70 GB), every preset runs on the base weights.

Tuning pieces (attention backend, inductor options, CUDA graphs, static shapes, compiled VAE:
models/presets/tuning.py) are switched on per call like compile; a weight set keeps one set of
compiled forwards per distinct compile (mode, static or dynamic, inductor options).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.presets.compiling import compile_forward, failure_summary, is_compile_failure
from models.presets.policy import (
    PRESET_ORDER,
    PRESETS,
    ActivePreset,
    CacheSetting,
    Hardware,
    Preset,
    adapt_to_hardware,
    nearest_enabled,
    without_tuning,
)
from models.presets.tuning import CompiledDecoder, attention_backend, attention_problem, cuda_graph_steps
from models.presets.weights import fuse_qkv_dropping_originals, quantize, set_vae_channels_last

if TYPE_CHECKING:
    from models.memory import MemoryPlan

log = logging.getLogger(__name__)

# How a weight set's blocks are compiled: the mode, dynamic shapes or not, inductor's options.
CompileKey = tuple[str, bool, tuple[tuple[str, Any], ...]]


def compile_key(preset: Preset) -> CompileKey:
    return (preset.compile, not preset.static_shapes, tuple(sorted(preset.inductor_options().items())))


def detect_hardware(device: str) -> Hardware:
    """What `device` can run, detected once (tests pass their own `Hardware`)."""
    import torch

    device_type = torch.device(device).type
    capability = torch.cuda.get_device_capability(device) if device_type == "cuda" else None
    # torchao is an optional extra ("accel"); importing it only to look costs a second and
    # logs warnings about GPU kernels, so look without importing.
    torchao = importlib.util.find_spec("torchao") is not None
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        from models.toolchain import triton_build_missing

        missing = triton_build_missing()  # Triton's C launcher needs a compiler and Python.h
        if missing:
            log.warning("compiled presets run eager: Triton cannot build kernels: %s", "; ".join(missing))
        compiler = has_triton() and not missing
    else:
        compiler = any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))
    probes = ("_is_vnni_supported", "_is_amx_tile_supported")  # private, so looked up with care
    int8_matmul = device_type != "cpu" or any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return Hardware(device_type, capability, torchao, compiler, int8_matmul)


def cache_config(setting: CacheSetting, steps: int) -> Any:
    """The diffusers hook configuration for a step-cache setting, for a call of `steps` steps."""
    if setting.kind == "mag":
        from diffusers import MagCacheConfig
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return MagCacheConfig(
            threshold=setting.threshold, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS
        )
    from diffusers import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=setting.threshold)


def set_compile_cache_dirs(data_dir: Path) -> Path:
    """Keep inductor's and Triton's caches in the data directory, so that a restart is fast.

    Must run before the first compile. Importing diffusers already fills
    TORCHINDUCTOR_CACHE_DIR with torch's default (/tmp/torchinductor_<user>), so only a value
    other than that default counts as the operator's own choice and is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    cache = Path(data_dir).resolve() / "compile-cache"
    cache.mkdir(parents=True, exist_ok=True)
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / "triton"))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


class PresetManager:
    def __init__(
        self,
        transformer: Any,
        *,
        device: str,
        enabled: list[str],
        data_dir: Any,
        presets: dict[str, Preset] | None = None,
        memory_plan: MemoryPlan | None = None,
        compile_backend: Any = "inductor",
        hardware: Hardware | None = None,
    ) -> None:
        """Builds every weight set the enabled presets need (quantizes, fuses, compiles lazily).

        `compile_backend` is passed to torch.compile (tests use "eager" or a CompileCounter).
        `memory_plan`: when it keeps a single weight set, no variant is copied.
        """
        self.presets = dict(presets or PRESETS)
        unknown = [name for name in enabled if name not in self.presets]
        if unknown or not enabled:
            raise ValueError(f"unknown or no presets enabled: {enabled!r}; known: {sorted(self.presets)}")
        self.enabled = [name for name in PRESET_ORDER if name in enabled] + [
            n for n in enabled if n not in PRESET_ORDER
        ]
        self.base = transformer
        self.device = device
        self.compile_backend = compile_backend
        self.hardware = hardware or detect_hardware(device)
        self.compile_cache_dir = set_compile_cache_dirs(Path(data_dir))
        self.single_weight_set = bool(memory_plan and memory_plan.single_weight_set)
        # The transformer's own weights: fp8 where the memory plan quantized them (torchao).
        self.base_precision = memory_plan.base_precision if memory_plan else "bf16"
        self.base_key = (self.base_precision, False)
        plan_name = memory_plan.name if memory_plan else ""

        # CUDA graphs replay fixed addresses: a plan that moves or recasts weights per call rules them out.
        weights_move = bool(
            memory_plan and (memory_plan.offload != "none" or memory_plan.transformer == "fp8-storage")
        )

        # name -> (the runnable preset, why it differs from the definition)
        self.runnable: dict[str, tuple[Preset, str | None]] = {}
        for name in self.enabled:
            adapted, note = adapt_to_hardware(
                self.presets[name],
                self.hardware,
                compile_backend=str(compile_backend),
                weights_move=weights_move,
            )
            problem = attention_problem(adapted.attention) if adapted.attention else None
            if problem:
                note = _join(note, f"{problem.rstrip('.')}; ran the default attention (PyTorch SDPA)")
                adapted = replace(adapted, attention=None)
            if self.single_weight_set and adapted.weight_set != self.base_key:
                ran_on = "fp8" if self.base_precision == "fp8" else "the loaded"
                extra = f"memory plan {plan_name!r} keeps one transformer weight set: ran on {ran_on} weights"
                if adapted.fuse_qkv:
                    extra += ", without fused QKV"
                note = _join(note, extra)
                adapted = replace(adapted, precision=self.base_precision, fuse_qkv=False)
            self.runnable[name] = (adapted, note)

        self._variants: dict[tuple[str, bool], Any] = {}
        # weight set -> how compiled -> {module: its compiled call}; switched on per call
        self._compiled: dict[tuple[str, bool], dict[CompileKey, dict[Any, Any]]] = {}
        # the VAE's compiled decoder, per set of inductor options (made at the first call)
        self._decoders: dict[tuple[tuple[str, Any], ...], CompiledDecoder] = {}
        for name, (preset, note) in list(self.runnable.items()):
            variant, failure = self._variant_for(preset)
            if failure:  # quantization failed at run time: fall back to the base weights
                log.warning("preset %s: %s", name, failure)
                preset = replace(preset, precision=self.base_precision, fuse_qkv=False)
                self.runnable[name] = (preset, _join(note, failure))
                variant, _ = self._variant_for(preset)
            if preset.compile != "none":
                self._compile(preset.weight_set, variant, preset)

    def demote(self, name: str, exc: BaseException) -> bool:
        """`name` failed to run: from now on it runs a simpler form, with a note saying why in
        every response that asks for it. A compile failure turns compile off (the preset keeps
        its weights and step cache); any other failure, or one of the eager form, falls back
        to `none`. Tuning pieces go first, whatever the failure: they are the newest parts.
        False when it already runs the plain base weights eagerly (nothing simpler is left: the
        failure is the model's, not the preset's)."""
        preset, note = self.runnable[name]
        why = failure_summary(exc)
        plain = Preset("none", precision=self.base_precision)
        if preset.tuning:
            simpler = without_tuning(preset)
            what = f"tuning ({', '.join(preset.tuning)}) failed ({why}); ran without it"
        elif preset.compile != "none" and is_compile_failure(exc):
            simpler = preset.eager()
            what = f"{preset.compile} compile failed ({why}); ran eager"
        elif preset != plain:
            simpler, what = plain, f"preset {name!r} failed ({why}); ran 'none'"
        else:
            return False
        log.warning("preset %s: %s", name, what, exc_info=exc)
        self.runnable[name] = (simpler, _join(note, what))
        return True

    def weight_sets(self) -> list[Any]:
        """Every transformer module the presets run: the loaded one and each copy (the
        residency manager moves them together, models/residency.py)."""
        modules = [self.base, *self._variants.values()]
        return list({id(m): m for m in modules}.values())

    def enabled_name(self, requested: str) -> str:
        """The enabled preset a request for `requested` runs (see `resolve`)."""
        return nearest_enabled(requested, self.enabled)

    # ------------------------------------------------------------------ building variants

    def _variant_for(self, preset: Preset) -> tuple[Any, str | None]:
        key = preset.weight_set
        if key in self._variants:
            return self._variants[key], None
        if key == self.base_key:
            self._variants[key] = self.base
            return self.base, None
        variant = copy.deepcopy(self.base)
        if preset.fuse_qkv:
            fuse_qkv_dropping_originals(variant)
        if preset.precision != "bf16":
            try:
                quantize(variant, preset.precision)
            except Exception as exc:  # e.g. torchao's assertion about the CUDA capability
                del variant
                why = failure_summary(exc)
                return self.base, f"{preset.precision} quantization failed ({why}); ran the loaded precision"
        self._variants[key] = variant
        return variant, None

    def _compile(self, key: tuple[str, bool], variant: Any, preset: Preset) -> None:
        """Compile once per weight set and way of compiling; `use` switches it on per call.

        We compile each module's `forward` (not `nn.Module.compile`, which compiles
        `_call_impl` and would trace diffusers' cache hooks: they graph-break and guard on each
        block's hook, recompiling per block). With the compiled forward installed first, the
        cache hooks wrap it from outside and every block shares one graph."""

        ways = self._compiled.setdefault(key, {})
        how = compile_key(preset)
        if how in ways:
            return
        if preset.compile == "regional":
            modules = [m for m in variant.modules() if m.__class__.__name__ in variant._repeated_blocks]
        else:  # whole model; recompiles when the first size was square (see cpu-code-paths.md)
            modules = [variant]
        options = preset.inductor_options()
        ways[how] = {
            m: compile_forward(
                m.forward, self.compile_backend, dynamic=not preset.static_shapes, options=options
            )
            for m in modules
        }

    def _set_compiled(self, key: tuple[str, bool], how: CompileKey | None) -> None:
        for each_way, forwards in self._compiled.get(key, {}).items():
            for module, compiled_forward in forwards.items():
                if each_way == how:
                    module.forward = compiled_forward
                else:
                    module.__dict__.pop("forward", None)  # back to the class's eager forward

    # ------------------------------------------------------------------ per call

    def resolve(self, requested: str) -> tuple[Preset, str | None]:
        """The preset that will run for `requested`, and the note explaining any difference."""
        notes: list[str] = []
        if requested not in self.presets:
            notes.append(f"unknown preset {requested!r}")
        name = self.enabled_name(requested)
        if name != requested and requested in self.presets:
            notes.append(
                f"preset {requested!r} is not enabled on this server (enabled: {', '.join(self.enabled)})"
            )
        if name != requested:
            notes[-1] += f"; ran {name!r}"
        preset, hw_note = self.runnable[name]
        if hw_note:
            notes.append(hw_note)
        decoder = self._decoders.get(tuple(sorted(preset.inductor_options(for_vae=True).items())))
        if preset.compile_vae and decoder is not None and decoder.failure:
            preset = replace(preset, compile_vae=False)
            notes.append(decoder.failure)
        return preset, ("; ".join(notes) or None)

    @contextmanager
    def use(
        self,
        pipe: Any,
        requested: str,
        *,
        steps: int = 28,
        base_weights: str | None = None,
        eager: bool = False,
    ) -> Iterator[ActivePreset]:
        """Run `pipe` (any pipeline sharing the transformer, e.g. img2img) with a preset, for a
        call that runs `steps` denoising steps (a schedule-based step cache needs the count).

        Swaps `pipe.transformer` for the preset's weight set, switches compile and the step
        cache on for this call only and restores everything afterwards. Not re-entrant.
        Order matters: compiled forwards go in before the cache hooks wrap them and come out
        after the hooks are removed.

        `base_weights`: why this call must run on the weights as loaded (LoRAs live on them);
        a preset with other weights keeps its compile and cache and says so in its note.
        `eager`: compile off for this call (the caller logs why)."""
        preset, note = self.resolve(requested)
        if base_weights is not None and preset.weight_set != self.base_key:
            dropped = ", ".join(
                part
                for part, on in (
                    (f"{preset.precision} weights", preset.precision != self.base_precision),
                    ("fused QKV", preset.fuse_qkv),
                )
                if on
            )
            preset = replace(preset, precision=self.base_precision, fuse_qkv=False)
            extra = f"{base_weights}: ran without {dropped}"
            note = f"{note}; {extra}" if note else extra
        if eager and preset.compile != "none":
            preset = preset.eager()
        variant, _ = self._variant_for(preset)
        if preset.compile != "none":
            self._compile(preset.weight_set, variant, preset)  # once; lazy until called
        original = pipe.transformer
        if variant is not original:
            pipe.transformer = variant
        self._set_compiled(preset.weight_set, compile_key(preset) if preset.compile != "none" else None)
        set_vae_channels_last(pipe.vae, preset.vae_channels_last)
        if preset.cache is not None:
            variant.enable_cache(cache_config(preset.cache, steps))  # fresh cache state per call
        try:
            with ExitStack() as pieces:
                pieces.enter_context(attention_backend(variant, preset.attention))
                pieces.enter_context(cuda_graph_steps(variant, on=preset.cuda_graphs))
                pieces.enter_context(self.decoding(pipe.vae, preset))  # a decode inside the pipeline
                yield ActivePreset(name=preset.name, note=note, requested=requested, preset=preset)
        finally:
            if preset.cache is not None:
                variant.disable_cache()
            self._set_compiled(preset.weight_set, None)
            if variant is not original:
                pipe.transformer = original

    @contextmanager
    def decoding(self, vae: Any, preset: Preset | None) -> Iterator[None]:
        """The VAE decode as `preset` runs it: compiled with its inductor options when it has
        `compile_vae` (the runtime decodes after `use`, around its own `vae.decode`)."""
        if preset is None or not preset.compile_vae:
            yield
            return
        options = preset.inductor_options(for_vae=True)
        key = tuple(sorted(options.items()))
        if key not in self._decoders:
            self._decoders[key] = CompiledDecoder(
                vae, lambda forward: compile_forward(forward, self.compile_backend, options=options)
            )
        with self._decoders[key].on():
            yield

    # ------------------------------------------------------------------ warm-up

    def warmup(
        self,
        pipe: Any,
        sizes: Iterable[tuple[int, int]],
        *,
        steps: int = 2,
        max_images: int = 1,
        names: Iterable[str] | None = None,
        base_weights: str | None = None,
    ) -> dict[str, float]:
        """Compile and warm every enabled preset (or `names`) at every size; returns seconds
        per preset. `base_weights`: warm them on the loaded weights, as `use` runs them then.

        Call before the worker reports ready. Compiles with dynamic shapes, so after this no
        configured size recompiles. `max_images > 1` also warms a batch of `max_images` at the
        smallest size: batch 1 is specialised (dynamo's 0/1 rule), the first larger batch
        compiles a graph with a symbolic batch that every batch from 2 up reuses.

        A preset whose warm-up fails is demoted (compiled -> eager -> `none`, see `demote`)
        and warmed again in its simpler form: a preset never keeps a worker from serving.
        Only a failure of the plain base weights themselves propagates."""
        sizes = list(sizes) or [(1024, 1024)]
        runs = [(w, h, 1) for w, h in sizes]
        if max_images > 1:
            runs.append((*min(sizes, key=lambda s: s[0] * s[1]), max_images))
        seconds: dict[str, float] = {}
        for name in self.enabled if names is None else list(names):
            start = time.perf_counter()
            while True:
                try:
                    self._warm(pipe, name, runs, steps=steps, base_weights=base_weights)
                    break
                except Exception as exc:
                    if not self.demote(name, exc):
                        raise
            seconds[name] = time.perf_counter() - start
            log.info(
                "warmed preset %s in %.1f s (%s)", name, seconds[name], self.runnable[name][0].describe()
            )
        return seconds

    def _warm(
        self, pipe: Any, name: str, runs: list[tuple[int, int, int]], *, steps: int, base_weights: str | None
    ) -> None:
        import torch

        for width, height, count in runs:
            with self.use(pipe, name, steps=steps, base_weights=base_weights) as active:
                assert active.preset is not None
                pipe(
                    prompt="warm-up",
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    num_images_per_prompt=count,
                    generator=torch.Generator("cpu").manual_seed(0),
                    output_type="pil" if active.preset.compile_vae else "latent",  # warms the decoder
                )


# ---------------------------------------------------------------------- helpers


def _join(note: str | None, extra: str) -> str:
    return f"{note}; {extra}" if note else extra
