"""Encoding generated images for the wire: deterministic bytes for a given image and format."""

from __future__ import annotations

import base64
import io

from PIL import Image

from server.jobs import CONTENT_TYPES, OutputFormat

JPEG_QUALITY = 95
WEBP_QUALITY = 95


def encode_image(image: Image.Image, fmt: OutputFormat) -> bytes:
    """Encode without metadata (no timestamps), so equal pixels give equal bytes."""
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"unsupported output format {fmt!r}; expected one of {sorted(CONTENT_TYPES)}")
    if fmt in ("jpeg", "webp") and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    elif fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="WEBP", quality=WEBP_QUALITY, method=4)
    return buffer.getvalue()


def content_type(fmt: OutputFormat) -> str:
    return CONTENT_TYPES[fmt]


def to_data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"
