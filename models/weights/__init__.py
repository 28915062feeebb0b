"""FLUX.1 weights from a local disk, never from a network.

- `models.weights.check` (torch-free, the supervisor's preflight): `resolve_model` turns
  `--model` into a checked `ModelSpec` or raises `WeightsError` naming what is missing.
- `models.weights.load`: `load_components(spec, dtype=...)` loads what the spec names.
- `models.weights.offline`: `enforce_offline()` keeps the Hugging Face libraries off the network.

The checking names are re-exported here, so `from models.weights import resolve_model` stays
torch-free.
"""

from models.weights.check import (
    FETCH_HINT,
    ModelSpec,
    WeightsError,
    check_pipeline_folder,
    check_redux_folder,
    check_single_file,
    check_transformer_folder,
    read_safetensors_header,
    resolve_model,
)

__all__ = [
    "FETCH_HINT",
    "ModelSpec",
    "WeightsError",
    "check_pipeline_folder",
    "check_redux_folder",
    "check_single_file",
    "check_transformer_folder",
    "read_safetensors_header",
    "resolve_model",
]
