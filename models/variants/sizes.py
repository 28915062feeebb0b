"""Image sizes and pixels around the image-conditioned variants (no torch): Kontext's output size
per `resolution_mode`, the size Fill and inpainting work at, and Fill's paste-back.

- `fitted_size(w, h)`: an input's own size as the runtime can make it: scaled into the side
  limits if it is outside them (keeping its ratio), then rounded to a multiple of 16.
- `kontext_output_size(mode, w, h)`: `match_input` -> `fitted_size`; `auto` -> the entry of
  `PREFERRED_KONTEXT_RESOLUTIONS` (diffusers' 17 training sizes) nearest the input's ratio;
  a ratio such as "16:9" -> that ratio at about 1 MP (1024^2), rounded to 16.
- `kontext_condition_size(mode, w, h)`: the size the input image is given to Kontext at: its
  fitted size for `match_input`, else the nearest preferred resolution (what diffusers'
  `_auto_resize` does, which Kontext was trained on).
- `finish_fill(images, original, mask, paste_back=..., resize_to_original=...)`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from models.request import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE

if TYPE_CHECKING:
    from PIL import Image

# diffusers.pipelines.flux.pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS (a test checks
# the copy), as (width, height).
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
KONTEXT_AREA = 1024 * 1024


def _round(value: float) -> int:
    return max(SIZE_MULTIPLE, int(value / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE)


def fitted_size(width: int, height: int) -> tuple[int, int]:
    """The input's size, scaled into MIN_SIDE..MAX_SIDE when outside (ratio kept; a ratio
    beyond 32:1 cannot fit both bounds and is clamped), rounded to a multiple of 16."""
    scale = 1.0
    if max(width, height) > MAX_SIDE:
        scale = MAX_SIDE / max(width, height)
    elif min(width, height) < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
    width, height = (min(MAX_SIDE, max(MIN_SIDE, _round(side * scale))) for side in (width, height))
    return width, height


def nearest_preferred(width: int, height: int) -> tuple[int, int]:
    ratio = width / height
    return min(PREFERRED_KONTEXT_RESOLUTIONS, key=lambda size: abs(ratio - size[0] / size[1]))


def ratio_size(mode: str) -> tuple[int, int]:
    """ "W:H" at about KONTEXT_AREA pixels, each side a multiple of 16."""
    w, _, h = mode.partition(":")
    ratio = int(w) / int(h)
    return _round(math.sqrt(KONTEXT_AREA * ratio)), _round(math.sqrt(KONTEXT_AREA / ratio))


def kontext_output_size(mode: str, width: int, height: int) -> tuple[int, int]:
    if mode == "match_input":
        return fitted_size(width, height)
    if mode == "auto":
        return nearest_preferred(width, height)
    return ratio_size(mode)


def kontext_condition_size(mode: str, width: int, height: int) -> tuple[int, int]:
    return fitted_size(width, height) if mode == "match_input" else nearest_preferred(width, height)


def finish_fill(
    images: list[Image.Image],
    original: Image.Image,
    mask: Image.Image,
    *,
    paste_back: bool,
    resize_to_original: bool,
) -> list[Image.Image]:
    """Fill's outputs as the client asked: resized to the input's exact size, then (paste_back)
    the input's pixels wherever the mask is black, blended along a soft mask's edge, so that
    only the white area differs from the input."""
    from PIL import Image

    finished = []
    for image in images:
        if resize_to_original and image.size != original.size:
            image = image.resize(original.size, Image.Resampling.LANCZOS)
        if paste_back:
            keep = (
                original
                if original.size == image.size
                else original.resize(image.size, Image.Resampling.LANCZOS)
            )
            alpha = mask.convert("L")
            if alpha.size != image.size:
                alpha = alpha.resize(image.size, Image.Resampling.BILINEAR)
            image = Image.composite(image, keep.convert("RGB"), alpha)
        finished.append(image)
    return finished
