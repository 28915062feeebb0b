"""Output sizes that follow an input image: Fill's and Kontext's, shared by every protocol.

fal's image-to-image refuses an input outside the output bounds (the output has the input's
size). Fill and Kontext instead scale such an input into the bounds, keeping its aspect ratio,
as fal documents for Kontext's `match_input` ("adjusted to be compatible with the model's
requirements (e.g. dimensions must be multiples of 16 and within supported limits)").

Kontext's other resolution modes follow diffusers' FluxKontextPipeline: `auto` is the preferred
Kontext resolution nearest the input's aspect ratio (the pipeline's own `_auto_resize` rule), a
ratio such as `16:9` is that ratio at about one megapixel (the pipeline's `max_area` rule).
"""

from __future__ import annotations

import math

from server.api.inputs import Fit, FitRule, InputImageError, target_fit
from server.jobs import MAX_PIXELS, MAX_SIDE, SIZE_MULTIPLE, ResolutionMode, round_size

# diffusers' PREFERRED_KONTEXT_RESOLUTIONS, (width, height): what FLUX.1 Kontext was trained on.
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip
# A ratio mode's area: diffusers' Kontext default `max_area`.
KONTEXT_AREA = 1024 * 1024
# The largest conditioning image Kontext resizes to (its preferred resolutions' longest side).
KONTEXT_MAX_SIDE = 1568


def scale_within(width: int, height: int, max_side: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect ratio kept, to at most `max_side` per side and
    `max_pixels` in all; unchanged when it fits already. Not rounded."""
    factor = min(1.0, max_side / max(width, height), math.sqrt(max_pixels / (width * height)))
    if factor >= 1.0:
        return width, height
    return max(1, math.floor(width * factor)), max(1, math.floor(height * factor))


def follow_input(width: int, height: int) -> tuple[int, int]:
    """The output size for an input of this size: the input's, rounded to a multiple of 16; an
    input over the bounds is first scaled into them (then rounded down, to stay inside).
    Raises InputImageError (`image_too_small`) for an input whose output would have a side
    under 64 px."""
    scaled = scale_within(width, height, MAX_SIDE, MAX_PIXELS)
    try:
        if scaled == (width, height):
            return round_size(width, height)
        return round_size(*(max(SIZE_MULTIPLE, side // SIZE_MULTIPLE * SIZE_MULTIPLE) for side in scaled))
    except ValueError as exc:
        raise InputImageError("image_too_small", f"The input image is {width}x{height}: {exc}") from None


def kontext_size(mode: ResolutionMode, width: int, height: int) -> tuple[int, int]:
    """Kontext's output size for an input of `width` x `height` under `mode`."""
    if mode == "match_input":
        return follow_input(width, height)
    if mode == "auto":
        aspect = width / height
        _, best_width, best_height = min(
            (abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS
        )
        return best_width, best_height
    ratio_width, _, ratio_height = mode.partition(":")
    aspect = int(ratio_width) / int(ratio_height)
    ratio_w = round(math.sqrt(KONTEXT_AREA * aspect)) // SIZE_MULTIPLE * SIZE_MULTIPLE
    ratio_h = round(math.sqrt(KONTEXT_AREA / aspect)) // SIZE_MULTIPLE * SIZE_MULTIPLE
    return ratio_w, ratio_h


# --- how each input image is stored (server/api/inputs.py shrinks it to its Fit at submit) ----


def follow_input_fit(width: int, height: int) -> Fit:
    """An image whose output follows it (Kontext inpaint, `match_input`): the output's size."""
    return target_fit(*follow_input(width, height))


def conditioning_fit(width: int, height: int) -> Fit:
    """A Kontext conditioning image under `auto` or a ratio, and Kontext's reference image: at
    most the size the pipeline resizes it to (about 1 MP), its aspect ratio kept."""
    return target_fit(*scale_within(width, height, KONTEXT_MAX_SIDE, KONTEXT_AREA))


def within_bounds_fit(width: int, height: int) -> Fit:
    """Fill's image: its own size (which `resize_to_original` restores), scaled into the
    output bounds when larger."""
    return target_fit(*scale_within(width, height, MAX_SIDE, MAX_PIXELS))


def kontext_image_fit(mode: ResolutionMode) -> FitRule:
    return follow_input_fit if mode == "match_input" else conditioning_fit
