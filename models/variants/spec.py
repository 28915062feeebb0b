"""Which checkpoints of the FLUX.1 [dev] family a server runs besides its base `--model`, checked
from names, configs and safetensors headers only (no torch): the supervisor's preflight runs it.

    specs = resolve_variants({"fill": "/w/FLUX.1-Fill-dev", "mine": "/w/mine.safetensors"},
                             model="/w/FLUX.1-dev", base_transformer_config=config)

Each variant is one transformer; the text encoders, tokenizers, VAE and scheduler are the
base's. What a value may be:
- a diffusers pipeline folder (`transformer/` inside, e.g. black-forest-labs/FLUX.1-Fill-dev),
- a bare transformer folder (`config.json` + weights),
- a single-file transformer (`.safetensors`, BFL's or diffusers' key layout, bf16 or fp8),
  loaded with the base's transformer config (its input width read from the file),
- "tiny" (with `--model tiny`) or "synthetic" (with `--model synthetic`): built, not read.

The architecture follows the name: `fill` runs FluxFillPipeline (input width 384: latents,
masked-image latents and the mask), `kontext` the Kontext pipelines, every other name (`krea`
and fine-tunes) the text-to-image family of pipelines, exactly as the base. A Fill checkpoint
configured under another name, or a 64-wide one as `fill`, is refused, naming both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from models.request import BASE_VARIANT  # the base --model (server.jobs.BASE_VARIANT too)
from models.weights.check import (
    WeightsError,
    check_single_file,
    check_transformer_folder,
    read_safetensors_header,
)

FILL, KONTEXT, KREA = "fill", "kontext", "krea"
FAMILY = (FILL, KONTEXT, KREA)
# With --model tiny and no variant configured, every tiny variant is served: every endpoint
# works without weights. The fine-tune's name is how clients choose it (docs/variants.md).
TINY_FINETUNE = "tiny-finetune"
DEFAULT_TINY_VARIANTS = (FILL, KONTEXT, KREA, TINY_FINETUNE)
BUILT_VALUES = ("tiny", "synthetic")

Architecture = Literal["dev", "fill", "kontext"]
Source = Literal["base", "built", "folder", "single-file"]
# Transformer input width: FLUX.1 [dev] packs 16 latent channels x 2x2 patches; Fill adds the
# masked image's latents (64) and the 8x8 mask per latent pixel x 2x2 patches (256).
DEV_IN_CHANNELS = 64
FILL_IN_CHANNELS = 384
VARIANT_FETCH_HINT = "fetch it with `python scripts/fetch_weights.py --variant {name} --dest <folder>`"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Config entries a variant shares with the base: it reads the base's text embeddings.
_SHARED_CONFIG = ("joint_attention_dim", "pooled_projection_dim", "attention_head_dim", "num_attention_heads")


@dataclass(frozen=True)
class VariantSpec:
    name: str
    architecture: Architecture
    source: Source
    # "folder": the transformer folder (config.json + weights); "single-file": the file;
    # "built": None (made by models/variants/tiny.py or synthetic at load); "base": None.
    path: Path | None
    value: str  # as configured, for logs and /health


def architecture_of(name: str) -> Architecture:
    return "fill" if name == FILL else "kontext" if name == KONTEXT else "dev"


def expected_in_channels(architecture: Architecture) -> int:
    return FILL_IN_CHANNELS if architecture == "fill" else DEV_IN_CHANNELS


def configured_variants(variants: Mapping[str, str], *, model: str) -> dict[str, str]:
    """The variants a server runs: as configured, or every tiny variant with `--model tiny` and
    none configured (documented default)."""
    if not variants and model == "tiny":
        return dict.fromkeys(DEFAULT_TINY_VARIANTS, "tiny")
    return dict(variants)


def resolve_variants(
    variants: Mapping[str, str],
    *,
    model: str,
    base_transformer_config: Mapping[str, Any] | None = None,
) -> dict[str, VariantSpec]:
    """Check every configured variant; raise WeightsError listing every problem (each naming
    the variant, what is wrong and where). `base_transformer_config`: the base's transformer
    config.json, to check that a variant reads the same text embeddings (None: not checked)."""
    specs: dict[str, VariantSpec] = {}
    problems: list[str] = []
    for name, value in configured_variants(variants, model=model).items():
        try:
            specs[name] = _resolve_one(name, str(value), model=model, base=base_transformer_config)
        except WeightsError as exc:
            problems.append(f"variant {name!r}: {exc}")
    if len(problems) == 1:
        raise WeightsError(problems[0])
    if problems:
        raise WeightsError(f"{len(problems)} variant problems:\n- " + "\n- ".join(problems))
    return specs


def _resolve_one(name: str, value: str, *, model: str, base: Mapping[str, Any] | None) -> VariantSpec:
    if name == BASE_VARIANT:
        raise WeightsError(f"{BASE_VARIANT!r} is the base --model's name; give the variant another name")
    if not _NAME.match(name):
        raise WeightsError(
            "a variant name is 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    architecture = architecture_of(name)
    if value in BUILT_VALUES:
        base_kind = "synthetic" if model.startswith("synthetic") else model
        if value != base_kind:
            raise WeightsError(
                f"{value!r} builds a variant like the base model, so it needs --model {value} "
                f"(got --model {model})"
            )
        return VariantSpec(name, architecture, "built", None, value)

    path = Path(value).expanduser()
    if not path.exists():
        hint = VARIANT_FETCH_HINT.format(name=name if name in FAMILY else "<name>")
        if _HUB_NAME.match(value) and not value.startswith((".", "/")):
            raise WeightsError(f"{value!r} is not a local path. flux-server never downloads weights: {hint}")
        raise WeightsError(f"the path does not exist: {path} ({hint})")
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer").is_dir() else path
        if not (folder / "config.json").is_file():
            raise WeightsError(
                f"{path} is neither a diffusers folder (expected {path / 'transformer'}/) nor a "
                f"transformer folder (expected {path / 'config.json'})"
            )
        config = check_transformer_folder(folder)
        _check_config(name, architecture, config, base, where=folder)
        return VariantSpec(name, architecture, "folder", folder, value)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path} is neither a folder nor a .safetensors transformer file")
    check_single_file(path)
    in_channels = single_file_in_channels(path)
    _check_in_channels(name, architecture, in_channels, where=path)
    return VariantSpec(name, architecture, "single-file", path, value)


def single_file_in_channels(path: Path) -> int:
    """The transformer's input width, from the header's `img_in`/`x_embedder` weight shape."""
    header = read_safetensors_header(path)
    for key, info in header.items():
        if key.removeprefix("model.diffusion_model.") in ("img_in.weight", "x_embedder.weight"):
            return int(info["shape"][1])
    raise WeightsError(f"{path} has no img_in.weight / x_embedder.weight: not a FLUX transformer")


def _check_config(
    name: str,
    architecture: Architecture,
    config: Mapping[str, Any],
    base: Mapping[str, Any] | None,
    *,
    where: Path,
) -> None:
    _check_in_channels(name, architecture, int(config.get("in_channels", DEV_IN_CHANNELS)), where=where)
    if base is None:
        return
    different = [key for key in _SHARED_CONFIG if key in base and config.get(key) != base.get(key)]
    if different:
        pairs = ", ".join(f"{k} {config.get(k)} vs the base's {base.get(k)}" for k in different)
        raise WeightsError(f"{where} is not a transformer of the base model's family ({pairs})")


def _check_in_channels(name: str, architecture: Architecture, in_channels: int, *, where: Path) -> None:
    expected = expected_in_channels(architecture)
    if in_channels == expected:
        return
    if in_channels == FILL_IN_CHANNELS:
        raise WeightsError(
            f"{where} is a Fill checkpoint (input width {in_channels}): configure it as 'fill'"
        )
    raise WeightsError(
        f"{where} has input width {in_channels}, but {name!r} needs {expected}"
        + (" (a FLUX.1 Fill [dev] checkpoint)" if architecture == "fill" else "")
    )
