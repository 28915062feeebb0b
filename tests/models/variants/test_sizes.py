"""Kontext's output sizes per resolution_mode, the size Fill works at, and Fill's paste-back."""

from __future__ import annotations

import pytest
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS as DIFFUSERS_SIZES
from PIL import Image

from models.request import RESOLUTION_MODES
from models.variants.sizes import (
    PREFERRED_KONTEXT_RESOLUTIONS,
    finish_fill,
    fitted_size,
    kontext_condition_size,
    kontext_output_size,
)
from tests.models.variants.conftest import box_mask, pattern


def test_the_preferred_sizes_are_diffusers_own() -> None:
    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == [tuple(s) for s in DIFFUSERS_SIZES]


@pytest.mark.parametrize(
    ("size", "fitted"),
    [
        ((64, 64), (64, 64)),
        ((72, 70), (80, 64)),
        ((1000, 750), (1008, 752)),
        ((4000, 3000), (2048, 1536)),
        ((40, 80), (64, 128)),
    ],
)
def test_fitted_size_rounds_to_16_inside_the_limits(size: tuple[int, int], fitted: tuple[int, int]) -> None:
    assert fitted_size(*size) == fitted


def test_match_input_keeps_the_input_size() -> None:
    assert kontext_output_size("match_input", 1000, 750) == (1008, 752)
    assert kontext_condition_size("match_input", 1000, 750) == (1008, 752)


def test_auto_picks_the_preferred_size_nearest_the_ratio() -> None:
    assert kontext_output_size("auto", 600, 400) == (1248, 832)  # 3:2
    assert kontext_output_size("auto", 300, 300) == (1024, 1024)
    assert kontext_condition_size("16:9", 600, 400) == (1248, 832)  # the input goes in at Kontext's size


@pytest.mark.parametrize("mode", [m for m in RESOLUTION_MODES if ":" in m])
def test_a_ratio_gives_that_ratio_at_about_one_megapixel(mode: str) -> None:
    width, height = kontext_output_size(mode, 64, 64)
    w, h = (int(v) for v in mode.split(":"))
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width / height - w / h) < 0.03
    assert 0.95 < width * height / 1024**2 < 1.05


def test_paste_back_keeps_every_unmasked_pixel() -> None:
    original = pattern(64, 64)
    generated = Image.new("RGB", (64, 64), (1, 2, 3))
    mask = box_mask(64, 64, (16, 16, 48, 48))
    [out] = finish_fill([generated], original, mask, paste_back=True, resize_to_original=False)
    assert out.getpixel((0, 0)) == original.getpixel((0, 0))
    assert out.getpixel((63, 63)) == original.getpixel((63, 63))
    assert out.getpixel((30, 30)) == (1, 2, 3)
    [untouched] = finish_fill([generated], original, mask, paste_back=False, resize_to_original=False)
    assert untouched.getpixel((0, 0)) == (1, 2, 3)


def test_resize_to_original_gives_the_input_size_then_pastes_its_pixels() -> None:
    original = pattern(72, 70)
    generated = Image.new("RGB", (80, 64), (1, 2, 3))
    mask = box_mask(72, 70, (20, 20, 50, 50))
    [out] = finish_fill([generated], original, mask, paste_back=True, resize_to_original=True)
    assert out.size == (72, 70)
    assert out.getpixel((5, 5)) == original.getpixel((5, 5))
    [plain] = finish_fill([generated], original, mask, paste_back=False, resize_to_original=False)
    assert plain.size == (80, 64)
