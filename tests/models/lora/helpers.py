"""Helpers for the LoRA tests: a tiny request, generating it with LoRAs, PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image

from models.lora.spec import LoraSpec
from models.request import GenerationRequest
from models.runtime import FluxRuntime, Generation


def tiny_request(**fields: Any) -> GenerationRequest:
    defaults = {"width": 64, "height": 64, "prompt": "a red cat", "steps": 2, "seed": 7}
    return GenerationRequest(**{**defaults, **fields})


def generate(runtime: FluxRuntime, *, loras: Sequence[LoraSpec] = (), **fields: Any) -> Generation:
    """One tiny request (64x64, 2 steps, seed 7 unless given) with these LoRAs."""
    return runtime.generate(tiny_request(loras=tuple(loras), **fields))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
