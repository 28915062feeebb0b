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

A preset the machine cannot run is adapted to the nearest runnable form (fp8 -> int8 -> the
loaded precision; compile -> eager when there is no compiler: `adapt_to_hardware`) and a preset
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
        return ", ".join(parts)


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
    preset: Preset, hw: Hardware, *, compile_backend: str = "inductor"
) -> tuple[Preset, str | None]:
    """The nearest form of `preset` this machine can run, and why it differs (None if it does not)."""
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
    return adapted, ("; ".join(reasons) or None)


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
