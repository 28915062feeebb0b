"""Input images (`image_url`): fetch a `data:` URI or an http(s) URL, decode, re-encode as PNG.

A URL of this server's own files (an upload) is read from the disk when the caller passes a
`local_file` resolver (see `LocalStorage.own_file`), without an HTTP round trip.

The worker receives the image already decoded and size-checked (`Job.image`, PNG bytes), so a
bad input fails at submit with a 422 instead of occupying a GPU. Errors carry fal's documented
error type names (`image_load_error`, `file_download_error`, `file_too_large`,
`image_too_large`), which adapters turn into their protocol's validation error shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

import httpx
from PIL import Image, UnidentifiedImageError

from server.fetch import FetchFailed, FetchPolicy, FetchRefused, TooLarge, fetch

# Decoding a huge image costs memory before any size check on the result could run.
MAX_INPUT_PIXELS = 64 * 1024 * 1024

# An input URL -> this server's file behind it, None for any other URL; FileNotFoundError for
# one of ours that is gone.
LocalFile = Callable[[str], Path | None]


class InputImageError(ValueError):
    """An input image that cannot be used; `error_type` is fal's name for the failure."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class InputImage:
    png: bytes
    width: int
    height: int


async def load_image(
    url: str, *, max_bytes: int, timeout: float, policy: FetchPolicy, local_file: LocalFile | None = None
) -> InputImage:
    """Fetch and decode an image URL. Raises InputImageError."""
    data = await fetch_bytes(url, max_bytes=max_bytes, timeout=timeout, policy=policy, local_file=local_file)
    # Decoding is CPU work: keep it off the event loop.
    return await asyncio.to_thread(decode_image, data)


async def fetch_bytes(
    url: str, *, max_bytes: int, timeout: float, policy: FetchPolicy, local_file: LocalFile | None = None
) -> bytes:
    """A data: URI's bytes, this server's own upload read from the disk, or an http(s) URL
    downloaded under the server's fetch policy."""
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_uri(url)
    elif scheme in ("http", "https"):
        local = await asyncio.to_thread(read_local, url, local_file, max_bytes) if local_file else None
        if local is not None:
            data = local
        else:
            data = await download(url, max_bytes=max_bytes, timeout=timeout, policy=policy)
    else:
        raise InputImageError("file_download_error", "image_url must be a data: URI or an http(s) URL")
    if len(data) > max_bytes:
        raise InputImageError("file_too_large", f"The image is larger than {max_bytes} bytes")
    return data


def read_local(url: str, local_file: LocalFile, max_bytes: int) -> bytes | None:
    """The bytes of this server's own file behind `url`, or None for any other URL."""
    try:
        path = local_file(url)
        if path is None:
            return None
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise InputImageError("file_download_error", str(exc)) from exc
    if len(data) > max_bytes:
        raise InputImageError("file_too_large", f"The image is larger than {max_bytes} bytes")
    return data


def decode_data_uri(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise InputImageError("image_load_error", "Malformed data URI: no ',' separator")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InputImageError("image_load_error", f"Malformed base64 in data URI: {exc}") from exc
    return unquote_to_bytes(payload)


async def download(url: str, *, max_bytes: int, timeout: float, policy: FetchPolicy) -> bytes:
    try:
        return await fetch(url, policy, max_bytes=max_bytes, timeout=timeout)
    except FetchRefused as exc:
        raise InputImageError("file_download_error", f"The image URL is refused: {exc}") from None
    except TooLarge:
        raise InputImageError("file_too_large", f"The image is larger than {max_bytes} bytes") from None
    except FetchFailed as exc:
        raise InputImageError("file_download_error", f"Downloading the image failed: {exc}") from None
    except httpx.HTTPError as exc:
        raise InputImageError("file_download_error", f"Downloading the image failed: {exc!r}") from exc


def decode_image(data: bytes) -> InputImage:
    """Decode any format PIL reads, flatten to RGB, re-encode as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise InputImageError(
                    "image_too_large",
                    f"The image is {image.width}x{image.height}; at most {MAX_INPUT_PIXELS} pixels",
                )
            rgb = image.convert("RGB")
    except InputImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputImageError("image_load_error", f"The image could not be decoded: {exc}") from exc
    out = io.BytesIO()
    # Fast compression: the PNG only travels from the API to the worker.
    rgb.save(out, format="PNG", compress_level=1)
    return InputImage(png=out.getvalue(), width=rgb.width, height=rgb.height)
