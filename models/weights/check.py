"""Check FLUX.1 weights on a local disk without loading them (no torch): the preflight.

`--model` accepts (see `resolve_model`):
- `tiny`: the tiny random model, built on first use into the data directory;
- `synthetic` or `synthetic:layers=N,...`: FLUX.1 [dev]'s architecture with random weights
  made at load (models/weights/synthetic.py), with the tiny model's tokenizers;
- a diffusers folder of FLUX.1 [dev] (`model_index.json`, `transformer/`, `vae/`, ...);
- a single-file transformer (`.safetensors`, BFL's or diffusers' key layout, bf16 or fp8),
  with a folder (`components_dir`) for the other components and the transformer's config.

`resolve_model` checks everything it can from file names, configs and safetensors headers,
so a broken set-up fails in well under a second, naming what is missing and where it was
expected. It never reads a tensor and never imports torch: the supervisor runs it in the API
process before any worker starts. Loading is models/weights/load.py's.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from models.tiny import TINY_DIRNAME, ensure_tiny
from models.weights.synthetic_spec import SyntheticSpec, is_synthetic, parse_synthetic

FETCH_HINT = "download them with `python scripts/fetch_weights.py --dest <folder>` on a connected machine"

PIPELINE_CLASS = "FluxPipeline"
MODEL_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
PIPELINE_COMPONENTS = (*MODEL_COMPONENTS, "tokenizer", "tokenizer_2", "scheduler")
REDUX_PARTS = ("image_encoder", "feature_extractor", "image_embedder")
# Weight file names diffusers (transformer, vae) and transformers (text encoders) look for.
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WeightsError(Exception):
    """Weights missing, incomplete or wrong; the message says what and where."""


@dataclass(frozen=True)
class ModelSpec:
    kind: Literal["diffusers", "single-file", "tiny", "synthetic"]
    folder: Path  # diffusers folder: configs, tokenizers and every component but a single file
    transformer_file: Path | None  # the single-file transformer, when kind == "single-file"
    redux_dir: Path | None  # image_encoder/, feature_extractor/, image_embedder/; None: no redux
    name: str  # for logs and the health endpoint
    synthetic: SyntheticSpec | None = None  # the block counts, when kind == "synthetic"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsError(f"{what} is missing: expected {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"{what} is not valid JSON: {path} ({exc})") from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{what} is not a JSON object: {path}")
    return data


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a .safetensors header (no tensor data) and check the file is not truncated."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsError(f"corrupt safetensors file (too short): {path}")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, 100_000_000):
                raise WeightsError(f"corrupt safetensors file (bad header length): {path}")
            header = json.loads(f.read(header_len))
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"corrupt safetensors file (header is not JSON): {path}") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"corrupt safetensors file (header is not a JSON object): {path}")
    data_len = size - 8 - header_len
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = int(info["data_offsets"][1])
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise WeightsError(f"corrupt safetensors file (bad entry {key!r}): {path}") from exc
        if end > data_len:
            raise WeightsError(f"truncated safetensors file ({key!r} runs past the end): {path}")
    return header


def _check_weights(component_dir: Path, component: str) -> None:
    """The component's weights exist (one file or every shard of an index) and are intact."""
    for name in _WEIGHT_NAMES:
        if (component_dir / name).is_file():
            read_safetensors_header(component_dir / name)
            return
        index_path = component_dir / f"{name}.index.json"
        if index_path.is_file():
            index = _read_json(index_path, f"the {component} shard index")
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise WeightsError(f"the {component} shard index lists no files: {index_path}")
            for shard in shards:
                shard_path = component_dir / shard
                if not shard_path.is_file():
                    raise WeightsError(f"{component} weight shard is missing: expected {shard_path}")
                read_safetensors_header(shard_path)
            return
    expected = " or ".join(str(component_dir / n) for n in _WEIGHT_NAMES)
    raise WeightsError(f"{component} weights are missing: expected {expected} (or a sharded .index.json)")


def _check_tokenizer(tokenizer_dir: Path, component: str, alternatives: list[tuple[str, ...]]) -> None:
    if any(all((tokenizer_dir / f).is_file() for f in files) for files in alternatives):
        return
    options = " or ".join(" + ".join(files) for files in alternatives)
    raise WeightsError(f"{component} files are missing: expected {options} in {tokenizer_dir}")


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise WeightsError(f"{what} is missing: expected the folder {path}")


def _raise_all(problems: list[str]) -> None:
    if len(problems) == 1:
        raise WeightsError(problems[0])
    if problems:
        raise WeightsError(f"{len(problems)} problems:\n- " + "\n- ".join(problems))


def _collect(problems: list[str], check: Callable[[], object]) -> None:
    try:
        check()
    except WeightsError as exc:
        problems.append(str(exc))


def check_pipeline_folder(folder: Path, *, need_transformer_weights: bool = True) -> None:
    """Check a diffusers FLUX.1 folder has every file loading needs.

    Raises WeightsError listing every problem found (each with the path it expected).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"model folder does not exist: {folder}")
    index = _read_json(folder / "model_index.json", "model_index.json")
    class_name = index.get("_class_name")
    if class_name != PIPELINE_CLASS:
        raise WeightsError(
            f"{folder} holds a {class_name or 'unknown'} model, not FLUX.1 "
            f"(model_index.json must name {PIPELINE_CLASS})"
        )
    problems: list[str] = []
    present = []
    for component in PIPELINE_COMPONENTS:
        if (folder / component).is_dir():
            present.append(component)
        else:
            problems.append(f"the {component} component is missing: expected the folder {folder / component}")
    for component in MODEL_COMPONENTS:
        if component not in present:
            continue
        _collect(problems, lambda c=component: _read_json(folder / c / "config.json", f"the {c} config"))
        if component != "transformer" or need_transformer_weights:
            _collect(problems, lambda c=component: _check_weights(folder / c, c))
    if "scheduler" in present:
        _collect(
            problems,
            lambda: _read_json(folder / "scheduler" / "scheduler_config.json", "the scheduler config"),
        )
    tokenizers = {
        "tokenizer": ("tokenizer (CLIP)", [("tokenizer.json",), ("vocab.json", "merges.txt")]),
        "tokenizer_2": ("tokenizer_2 (T5)", [("tokenizer.json",), ("spiece.model",)]),
    }
    for component, (what, alternatives) in tokenizers.items():
        if component in present:
            _collect(problems, lambda c=component, w=what, a=alternatives: _check_tokenizer(folder / c, w, a))
    _raise_all(problems)


def check_transformer_folder(folder: Path) -> dict[str, Any]:
    """A bare FLUX transformer folder (config.json naming FluxTransformer2DModel, and its
    weights, whole or sharded); returns the config."""
    config = _read_json(folder / "config.json", "the transformer config")
    class_name = config.get("_class_name")
    if class_name not in (None, "FluxTransformer2DModel"):
        raise WeightsError(f"{folder} holds a {class_name}, not a FluxTransformer2DModel")
    _check_weights(folder, "transformer")
    return config


def check_redux_folder(redux_dir: Path) -> None:
    """Check the redux parts (image_encoder/, feature_extractor/, image_embedder/)."""
    _require_dir(redux_dir, "the redux folder")
    problems: list[str] = []
    for part in REDUX_PARTS:
        _collect(problems, lambda p=part: _require_dir(redux_dir / p, f"the redux {p}"))
    for part in ("image_encoder", "image_embedder"):
        if (redux_dir / part).is_dir():
            _collect(
                problems, lambda p=part: _read_json(redux_dir / p / "config.json", f"the redux {p} config")
            )
            _collect(problems, lambda p=part: _check_weights(redux_dir / p, f"redux {p}"))
    if (redux_dir / "feature_extractor").is_dir():
        config = redux_dir / "feature_extractor" / "preprocessor_config.json"
        _collect(problems, lambda: _read_json(config, "the redux feature_extractor config"))
    _raise_all(problems)


def check_single_file(path: Path) -> None:
    """The file parses and holds a FLUX transformer in BFL's or diffusers' key layout."""
    from models.single_file import looks_like_bfl, looks_like_diffusers

    header = read_safetensors_header(path)
    keys = [k for k in header if k != "__metadata__"]
    if any(k.endswith(("scaled_fp8", ".scale_weight", ".scale_input")) for k in keys):
        raise WeightsError(
            f"{path} is a scaled-fp8 checkpoint (per-tensor scale keys), which is not supported: "
            "use a bf16 or plain float8_e4m3fn transformer file"
        )
    if not (looks_like_bfl(keys) or looks_like_diffusers(keys)):
        raise WeightsError(
            f"{path} does not look like a FLUX transformer: expected keys double_blocks.* (BFL layout) "
            "or transformer_blocks.* (diffusers layout), optionally under model.diffusion_model."
        )


def _redux_dir_of(folder: Path) -> Path | None:
    redux = folder / "redux"
    if not redux.exists():
        return None
    check_redux_folder(redux)
    return redux


def resolve_model(model: str, *, data_dir: Path, components_dir: Path | None = None) -> ModelSpec:
    """Turn `--model` into a checked ModelSpec, or raise WeightsError saying what is wrong.

    `components_dir` (a diffusers FLUX folder, or "tiny") is required with a single file.
    """
    if model == "tiny":
        folder = ensure_tiny(data_dir)
        return ModelSpec("tiny", folder, None, folder / "redux", "tiny")
    if is_synthetic(model):
        try:
            synthetic = parse_synthetic(model)
        except ValueError as exc:
            raise WeightsError(str(exc)) from None
        # Only the tiny model's tokenizers and scheduler are read; it is built at load (torch).
        folder = Path(data_dir) / TINY_DIRNAME
        return ModelSpec("synthetic", folder, None, None, synthetic.name, synthetic=synthetic)

    path = Path(model).expanduser()
    if not path.exists():
        if _HUB_NAME.match(model) and not model.startswith((".", "/")):
            raise WeightsError(
                f"{model!r} is not a local folder. flux-server never downloads weights: "
                f"{FETCH_HINT}, then pass that folder to --model"
            )
        raise WeightsError(f"model path does not exist: {path}")

    if path.is_dir():
        check_pipeline_folder(path)
        return ModelSpec("diffusers", path, None, _redux_dir_of(path), path.name)

    if path.suffix != ".safetensors":
        raise WeightsError(f"{path} is neither a diffusers folder nor a .safetensors transformer file")
    check_single_file(path)
    if components_dir is None:
        raise WeightsError(
            f"{path} is a single-file transformer: also give (--components-dir) a diffusers FLUX.1 "
            "folder for the other components (VAE, text encoders, tokenizers, scheduler and "
            "transformer/config.json)"
        )
    if str(components_dir) == "tiny" and not Path(components_dir).exists():
        folder = ensure_tiny(data_dir)
    else:
        folder = Path(components_dir).expanduser()
        check_pipeline_folder(folder, need_transformer_weights=False)
    return ModelSpec("single-file", folder, path, _redux_dir_of(folder), path.name)
