"""Acceleration presets (none / regular / high) as frozen dataclasses, and the rules that pick
what runs: torch-free, so the API process and the settings can use them.

The presets (figures: H100, 1024x1024, 28 steps; see docs/benchmarks.md):

- `none`: the weights as loaded (bf16 on a GPU, fp32 on a CPU), eager. The quality reference.
- `regular`: regional compile of the repeated blocks (`compile_repeated_blocks(dynamic=True)`:
  ~10 s compile instead of ~70 s, no recompiles across resolutions), fused QKV projections,
  channels-last VAE and torchao fp8 dynamic row-wise linears (published: ~3.0 s vs ~6.6 s eager).
  fp8 needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper, Blackwell); elsewhere it
  runs int8 dynamic (int8 tensor cores on Ampere; compiled int8dq on H100 is 3.4 s) and says so.
- `high`: `regular` plus First Block Cache at threshold 0.12 (the published near-lossless
  point under fp8; 0.08 for bf16): steps whose first-block residual barely changed reuse the
  cached output of the remaining blocks.

Tuning pieces (flux-fast's, beyond `regular`; `TUNING`, applied by models/presets/tuning.py):
FlashAttention-3 or cuDNN attention through diffusers' attention backends, inductor's tuned
flags, max-autotune, a compiled VAE decode, CUDA graphs and static shapes. Each is a field of
`Preset`, off in the shipped presets until a GPU measurement shows it helps (the bench measures
each on top of `regular`: scripts/bench_gpu.py); an operator turns them on for every preset but
`none` with `--preset-tuning` (`with_tuning`).

A preset the machine cannot run is adapted to the nearest runnable form (fp8 -> int8 -> the
loaded precision; compile -> eager when there is no compiler; a tuning piece the device cannot
run is left out: `adapt_to_hardware`) and a preset
the server did not enable is replaced by the nearest enabled one (`nearest_enabled`); either
way the note that comes with it says exactly why. Applying presets to a transformer is
models/presets/apply.py's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

Precision = Literal["bf16", "fp8", "int8"]
CompileMode = Literal["none", "regional", "full"]
PRESET_ORDER = ("none", "regular", "high")


@dataclass(frozen=True)
class CacheSetting:
    """A diffusers step-cache hook.

    - `first_block` (First Block Cache, the `high` preset's): skips a step's remaining blocks
      when the first block's output barely changed: the decision follows the activations.
    - `mag` (MagCache with FLUX.1 [dev]'s published magnitude ratios): skips on the step
      schedule alone, whatever the weights; the benchmark's fixed skip schedule for random
      weights, on which First Block Cache's decisions mean nothing.
    """

    kind: Literal["first_block", "mag"] = "first_block"
    threshold: float = 0.12

    def describe(self) -> str:
        if self.kind == "mag":
            return f"MagCache {self.threshold:g} (FLUX.1 [dev] magnitude ratios: a fixed skip schedule)"
        return f"First Block Cache {self.threshold:g}"


@dataclass(frozen=True)
class Preset:
    name: str
    # "bf16" means "the weights as loaded": bf16 on a GPU, fp32 on a CPU (no fast bf16 matmuls there).
    precision: Precision = "bf16"
    compile: CompileMode = "none"
    fuse_qkv: bool = False
    vae_channels_last: bool = False
    cache: CacheSetting | None = None
    # Tuning pieces (see TUNING), all off in the shipped presets.
    attention: str | None = None  # a diffusers attention backend, e.g. "_flash_3" (FA3)
    inductor_flags: bool = False  # flux-fast's inductor flags (TUNED_INDUCTOR_FLAGS)
    autotune: bool = False  # inductor's max-autotune (GEMM templates), without CUDA graphs
    cuda_graphs: bool = False  # compiled blocks replayed as CUDA graphs ("reduce-overhead")
    static_shapes: bool = False  # compile per shape (dynamic=False) instead of one dynamic graph
    compile_vae: bool = False  # the VAE decoder compiled too

    @property
    def weight_set(self) -> tuple[str, bool]:
        """Presets with the same weight set share one transformer module."""
        return (self.precision, self.fuse_qkv)

    def describe(self) -> str:
        parts = [
            {"bf16": "weights as loaded", "fp8": "fp8 dynamic row-wise", "int8": "int8 dynamic"}[
                self.precision
            ]
        ]
        if self.compile != "none":
            parts.append(f"{self.compile} compile")
        if self.fuse_qkv:
            parts.append("fused QKV")
        if self.vae_channels_last:
            parts.append("channels-last VAE")
        if self.cache is not None:
            parts.append(self.cache.describe())
        parts += self.tuning
        return ", ".join(parts)

    def eager(self) -> Preset:
        """This preset without its transformer's compile and the pieces that live in it."""
        return replace(self, compile="none", **dict.fromkeys(COMPILED_PIECES, False))  # type: ignore[arg-type]

    @property
    def tuning(self) -> list[str]:
        """The tuning pieces this preset has on, as reports name them."""
        labels = [piece.label for piece in TUNING.values() if piece.is_on(self)]
        if self.attention is not None and not any(
            "attention" in p.fields and p.is_on(self) for p in TUNING.values()
        ):
            labels.append(f"attention backend {self.attention}")  # one TUNING does not name
        return labels

    def inductor_options(self, *, for_vae: bool = False) -> dict[str, object]:
        """torch.compile's inductor options for this preset (its `options=`): the tuned flags,
        max-autotune and CUDA graphs (never for the VAE: one decode per image gains nothing
        from saved launches, and a CUDA graph's static output would be reused by the next)."""
        options: dict[str, object] = {}
        if self.inductor_flags:
            options.update(TUNED_INDUCTOR_FLAGS)
        if self.autotune:  # torch's mode "max-autotune-no-cudagraphs"
            options.update({"max_autotune": True, "coordinate_descent_tuning": True})
        if self.cuda_graphs and not for_vae:  # torch's mode "reduce-overhead"
            options["triton.cudagraphs"] = True
        return options


# flux-fast's inductor flags (huggingface/flux-fast, utils/pipeline_utils.py), set there on the
# global config; here only inside each compile of a preset that has `inductor_flags`.
TUNED_INDUCTOR_FLAGS: dict[str, object] = {
    "conv_1x1_as_mm": True,  # 1x1 convolutions (the VAE's) as matrix products
    "epilogue_fusion": False,  # no pointwise ops fused into the matmul templates
    "coordinate_descent_tuning": True,  # tune each Triton kernel's block sizes
    "coordinate_descent_check_all_directions": True,
}
# Tuning fields that mean something only inside the transformer's compile (the VAE's compile,
# `compile_vae`, is its own: it needs a compiler, not a compiled transformer).
COMPILED_PIECES = ("inductor_flags", "autotune", "cuda_graphs", "static_shapes")
FLASH_ATTENTION_3 = ("_flash_3", "_flash_varlen_3")  # diffusers' FA3 backends (Hopper only)
CPU_ATTENTION = ("native", "_native_math")  # diffusers backends that run on a CPU


@dataclass(frozen=True)
class TuningPiece:
    """One flux-fast piece as `Preset` field values, and how it is named in reports."""

    label: str
    fields: dict[str, object]

    def is_on(self, preset: Preset) -> bool:
        return all(getattr(preset, key) == value for key, value in self.fields.items())


# Names an operator gives (--preset-tuning) and bench rows use; server/config.py lists the same.
TUNING: dict[str, TuningPiece] = {
    "inductor-flags": TuningPiece("inductor flags", {"inductor_flags": True}),
    "compiled-vae": TuningPiece("compiled VAE decode", {"compile_vae": True}),
    "cuda-graphs": TuningPiece("CUDA graphs", {"cuda_graphs": True}),
    "fa3": TuningPiece("FlashAttention-3", {"attention": "_flash_3"}),
    "cudnn-attention": TuningPiece("cuDNN attention", {"attention": "_native_cudnn"}),
    "static-shapes": TuningPiece("static shapes", {"static_shapes": True}),
    "max-autotune": TuningPiece("max-autotune", {"autotune": True}),
}
# Each piece's fields at their defaults: a preset without any piece.
_UNTUNED = {key: getattr(Preset("untuned"), key) for piece in TUNING.values() for key in piece.fields}


def with_tuning(preset: Preset, pieces: Iterable[str]) -> Preset:
    """`preset` with the named tuning pieces on (ValueError for an unknown name; the last
    attention backend named wins)."""
    changes: dict[str, object] = {}
    for name in pieces:
        if name not in TUNING:
            raise ValueError(f"unknown tuning piece {name!r}; known: {', '.join(TUNING)}")
        changes.update(TUNING[name].fields)
    return replace(preset, **changes)  # type: ignore[arg-type]


def without_tuning(preset: Preset) -> Preset:
    return replace(preset, **_UNTUNED)  # type: ignore[arg-type]


def tuned_presets(pieces: Iterable[str], presets: dict[str, Preset] | None = None) -> dict[str, Preset]:
    """The presets with the named pieces on every one but `none` (the plain diffusers reference)."""
    pieces = list(pieces)
    presets = dict(presets or PRESETS)
    return {name: p if name == "none" else with_tuning(p, pieces) for name, p in presets.items()}


PRESETS: dict[str, Preset] = {
    "none": Preset("none"),
    "regular": Preset("regular", precision="fp8", compile="regional", fuse_qkv=True, vae_channels_last=True),
    "high": Preset(
        "high",
        precision="fp8",
        compile="regional",
        fuse_qkv=True,
        vae_channels_last=True,
        cache=CacheSetting("first_block", threshold=0.12),
    ),
}


@dataclass(frozen=True)
class ActivePreset:
    """What ran. `name` and `note` are the runtime's contract; the rest is for logs and metrics."""

    name: str
    note: str | None
    requested: str | None = None
    preset: Preset | None = None


@dataclass(frozen=True)
class Hardware:
    """What the machine can run, detected once (tests pass their own)."""

    device_type: str  # "cpu" | "cuda"
    cuda_capability: tuple[int, int] | None
    torchao: bool
    compiler: bool  # can torch.compile's inductor backend build kernels here?
    # int8 matrix units: every CUDA GPU the server runs on; on a CPU, AVX512-VNNI or AMX. Without
    # them torch's int8 matmul falls back to a scalar loop, many times slower than fp32 (an
    # AVX2 CPU spent over 10 minutes on one 528x3072x12288 product that fp32 does in 0.8 s).
    int8_matmul: bool = True

    def describe(self) -> str:
        if self.device_type == "cuda" and self.cuda_capability is not None:
            return f"CUDA compute capability {self.cuda_capability[0]}.{self.cuda_capability[1]}"
        return self.device_type.upper()


def adapt_to_hardware(
    preset: Preset, hw: Hardware, *, compile_backend: str = "inductor", weights_move: bool = False
) -> tuple[Preset, str | None]:
    """The nearest form of `preset` this machine can run, and why it differs (None if it does not).

    `weights_move`: the memory plan moves or recasts the transformer's weights at every call
    (offload, fp8 storage), so a CUDA graph, which replays fixed addresses, cannot hold them."""
    reasons: list[str] = []
    precision = preset.precision
    if precision == "fp8" and not (hw.device_type == "cuda" and (hw.cuda_capability or (0, 0)) >= (8, 9)):
        precision = "int8"
        reasons.append(
            f"fp8 dynamic needs an NVIDIA GPU with compute capability 8.9+ (this device: {hw.describe()})"
        )
    if precision == "int8" and not hw.int8_matmul:
        reasons.append(
            "int8 dynamic needs int8 matrix units (AVX512-VNNI or AMX on a CPU), which this CPU lacks"
        )
        precision = "bf16"
    if precision in ("fp8", "int8") and not hw.torchao:
        reasons.append(
            f"{precision} needs torchao, which is not installed (pip install 'flux-server[accel]')"
        )
        precision = "bf16"
    if reasons and precision == "int8":
        reasons[-1] += "; ran int8 dynamic instead"
    elif reasons:
        reasons[-1] += "; ran the loaded precision instead"

    compile_mode = preset.compile
    if compile_mode != "none" and compile_backend == "inductor" and not hw.compiler:
        tool = "Triton" if hw.device_type == "cuda" else "a C++ compiler (g++ or clang++)"
        reasons.append(f"torch.compile's inductor needs {tool}, not found; ran eager")
        compile_mode = "none"

    adapted = replace(preset, precision=precision, compile=compile_mode)
    adapted, tuning_reasons = _adapt_tuning(adapted, hw, compile_backend, weights_move)
    return adapted, ("; ".join(reasons + tuning_reasons) or None)


def _adapt_tuning(
    preset: Preset, hw: Hardware, compile_backend: str, weights_move: bool
) -> tuple[Preset, list[str]]:
    """Leaves out each tuning piece this machine cannot run, saying why (the packages an
    attention backend needs are checked with the torch side: models/presets/tuning.py)."""
    reasons: list[str] = []
    changes: dict[str, object] = {}
    if preset.attention in FLASH_ATTENTION_3 and not (
        hw.device_type == "cuda" and (hw.cuda_capability or (0, 0))[0] == 9
    ):
        reasons.append(
            f"FlashAttention-3 needs a Hopper GPU (compute capability 9.x; this device: {hw.describe()})"
        )
    elif preset.attention is not None and hw.device_type != "cuda" and preset.attention not in CPU_ATTENTION:
        reasons.append(
            f"attention backend {preset.attention!r} needs a CUDA device (this device: {hw.describe()})"
        )
    if reasons:
        changes["attention"] = None
        reasons[-1] += "; ran the default attention (PyTorch SDPA)"
    if preset.compile_vae and compile_backend == "inductor" and not hw.compiler:
        changes["compile_vae"] = False  # with the compile note above: no compiler here
    if preset.compile == "none":
        changes.update(dict.fromkeys(COMPILED_PIECES, False))  # eager: a note says why when it matters
    elif preset.cuda_graphs and hw.device_type != "cuda":
        changes["cuda_graphs"] = False
        reasons.append(f"CUDA graphs need a CUDA device (this device: {hw.describe()}); ran without")
    elif preset.cuda_graphs and weights_move:
        changes["cuda_graphs"] = False
        reasons.append(
            "CUDA graphs need the transformer's weights to stay in place, and this memory plan "
            "moves them; ran without"
        )
    adapted = replace(preset, **changes)  # type: ignore[arg-type]
    inductor_only = [
        TUNING[name].label
        for name in ("inductor-flags", "max-autotune", "cuda-graphs")
        if TUNING[name].is_on(adapted)
    ]
    if inductor_only and compile_backend != "inductor":
        reasons.append(
            f"{', '.join(inductor_only)}: inductor's (compile backend here: {compile_backend}), "
            "so they change nothing"
        )
    return adapted, reasons


def default_presets(device: str) -> list[str]:
    """Every preset on a GPU; only `none` on a CPU, where compiling the int8 transformer takes
    minutes (43-234 s for the tiny model on 2 cores): far too long for a request to wait."""
    return list(PRESET_ORDER) if device == "cuda" else ["none"]


def default_warmup_sizes(device: str) -> list[tuple[int, int]]:
    """Sizes compiled before a GPU worker reports ready: fal's default (landscape_4_3) and
    square_hd. Other sizes reuse the same graphs (regional compile is dynamic in shape)."""
    return [(1024, 768), (1024, 1024)] if device == "cuda" else []


def nearest_enabled(requested: str, enabled: Iterable[str]) -> str:
    """The enabled preset closest to `requested` in none < regular < high (ties go to the slower one)."""
    enabled = list(enabled)
    if requested in enabled:
        return requested
    where = PRESET_ORDER.index(requested) if requested in PRESET_ORDER else 0
    return min(enabled, key=lambda name: (abs(PRESET_ORDER.index(name) - where), PRESET_ORDER.index(name)))
