"""Shared for the variant tests: one eager tiny runtime with every tiny variant (what
`--model tiny` serves by default), images and masks as PNG bytes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from models.loading import load_runtime
from models.runtime import FluxRuntime


@pytest.fixture(scope="session")
def variant_runtime(tiny_model_dir: Path) -> FluxRuntime:
    return load_runtime("tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pattern(width: int, height: int) -> Image.Image:
    """A deterministic, non-flat RGB image."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [((x * 7) % 256, (y * 5) % 256, (x + y) % 256) for y in range(height) for x in range(width)]
    )
    return image


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black (keep) with a white (repaint) box."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask
