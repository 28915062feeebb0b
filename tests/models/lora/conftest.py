"""Shared for the LoRA tests: one eager tiny runtime and LoRA files written for it.

`lora_file(name, **write_lora_kwargs)` writes (once per session) a LoRA for the tiny model
under pytest's temporary directory and returns its `LoraSpec`-ready path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from models.loading import load_runtime
from models.lora.tiny_loras import write_lora
from models.runtime import FluxRuntime


@pytest.fixture(scope="session")
def lora_runtime(tiny_model_dir: Path) -> FluxRuntime:
    """Eager ("none" only): LoRAs are plain named adapters here."""
    return load_runtime("tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",))


@pytest.fixture(scope="session")
def lora_file(tmp_path_factory: pytest.TempPathFactory, lora_runtime: FluxRuntime) -> Callable[..., Path]:
    folder = tmp_path_factory.mktemp("loras")
    written: dict[str, Path] = {}

    def make(name: str, *, text_encoder: bool = False, **kwargs: Any) -> Path:
        if name not in written:
            written[name] = write_lora(
                folder / f"{name}.safetensors",
                lora_runtime.pipe.transformer,
                text_encoder=lora_runtime.pipe.text_encoder if text_encoder else None,
                **kwargs,
            )
        return written[name]

    return make
