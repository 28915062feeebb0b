"""Output encoding: right format and size, deterministic bytes, data URIs."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from server.images import encode_image, to_data_uri


@pytest.mark.parametrize(("fmt", "pil_name"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_encode_is_deterministic_and_decodable(fmt: str, pil_name: str) -> None:
    image = Image.new("RGB", (80, 48), (200, 30, 30))
    data = encode_image(image, fmt)
    assert encode_image(image.copy(), fmt) == data
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == pil_name and decoded.size == (80, 48)


def test_rgba_is_flattened_for_jpeg_and_bad_formats_are_refused() -> None:
    data = encode_image(Image.new("RGBA", (16, 16)), "jpeg")
    assert data[:2] == b"\xff\xd8"
    with pytest.raises(ValueError):
        encode_image(Image.new("RGB", (16, 16)), "gif")  # type: ignore[arg-type]


def test_data_uri() -> None:
    uri = to_data_uri(b"\x89PNG", "image/png")
    assert uri == "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
