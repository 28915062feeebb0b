"""Input images (`image_url`, `mask_url`, BFL's `image_prompt`): fetch a `data:` URI or an
http(s) URL, check the header, decode, shrink to what the model uses, re-encode as PNG.

A URL of this server's own files (an upload) is read from its store (the disk or the bucket)
when the caller passes a `local_file` reader (see `Storage.read_own`), without an HTTP round
trip through this server.

Bounded at every step, so that a burst of image submits cannot take the API process's cores
and memory: the bytes by `max_bytes`; the pixels by the header (format and size are read
before anything is decoded: a 20000x20000 PNG of a few bytes is refused at once); the stored
result by a `Fit`, the size the model resizes the input to anyway (the job's size for
image-to-image and inpainting, SigLIP's 384 px for Redux), done here with the model's own
filter so the model sees the same pixels; and the decoding itself by a small thread pool
(`decode_threads`), where extra submits wait their turn.

The worker receives the image already decoded and size-checked (`Job.image`, PNG bytes), so a
bad input fails at submit with a 422 instead of occupying a GPU. Errors carry fal's documented
error type names (`image_load_error`, `file_download_error`, `file_too_large`,
`image_too_large`), which adapters turn into their protocol's validation error shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ctypes
import io
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

import httpx
from PIL import Image, UnidentifiedImageError

from server.fetch import FetchFailed, FetchPolicy, FetchRefused, TooLarge, fetch
from server.jobs import REDUX_INPUT_SIDE
from server.storage.base import StorageUnavailable

# Checked on the header, before decoding: decoding a huge image costs its memory first.
MAX_INPUT_PIXELS = 64 * 1024 * 1024
# The formats a client's image may be in (PIL's names; "JPEG" includes the multi-picture
# JPEGs of many phones). Others PIL could open (EPS runs Ghostscript, PSD, ICO, ...) are
# refused unread.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

# (An input URL, at most this many bytes) -> the bytes of this server's file behind it, None
# for any other URL; FileNotFoundError for one of ours that is gone.
LocalFile = Callable[[str, int], bytes | None]


class InputImageError(ValueError):
    """An input image that cannot be used; `error_type` is fal's name for the failure."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class InputImage:
    png: bytes
    width: int  # of the stored image (after its Fit)
    height: int
    source_width: int  # of the image the client sent
    source_height: int


@dataclass(frozen=True)
class Fit:
    """The size the model resizes an input image to, and its filter. An image larger in
    either dimension is resized to exactly that here, so the stored image is no larger than
    what the model uses, and the model's own resize then finds nothing to do (PIL returns an
    image already at the size unchanged): the same pixels as resizing the original there. A
    smaller image is kept as sent; the model scales it up as before."""

    width: int
    height: int
    resample: Image.Resampling
    grayscale: bool = False  # a mask: one channel once at the size (diffusers resizes, then grays)

    def apply(self, image: Image.Image) -> Image.Image:
        if image.width > self.width or image.height > self.height:
            image = image.resize((self.width, self.height), self.resample)
        if self.grayscale and image.size == (self.width, self.height):
            return image.convert("L")  # a smaller mask stays RGB: the model resizes it first
        return image


def target_fit(width: int, height: int) -> Fit:
    """An image-to-image or inpainting image: FluxImg2ImgPipeline and FluxInpaintPipeline
    resize it to the job's size with Lanczos (diffusers' VaeImageProcessor default)."""
    return Fit(width, height, Image.Resampling.LANCZOS)


def mask_fit(width: int, height: int) -> Fit:
    """An inpainting mask: FluxInpaintPipeline's mask processor resizes it to the job's size
    (the image's) with Lanczos, then makes it grayscale. Gray stored as L comes back from
    RGB exactly, so one channel is all that needs storing."""
    return Fit(width, height, Image.Resampling.LANCZOS, grayscale=True)


# Redux: FluxPriorReduxPipeline's SiglipImageProcessor resizes to 384x384 with bicubic.
REDUX_FIT = Fit(REDUX_INPUT_SIDE, REDUX_INPUT_SIDE, Image.Resampling.BICUBIC)

# A Fit, or one computed from the image's size as its header gives it (e.g. fal's
# image-to-image, whose output size is the input's); it may raise InputImageError.
FitRule = Fit | Callable[[int, int], Fit]


async def load_image(
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    policy: FetchPolicy,
    fit: FitRule | None = None,
    threads: int | None = None,
    local_file: LocalFile | None = None,
) -> InputImage:
    """Fetch, check and decode an image URL. Raises InputImageError."""
    data = await fetch_bytes(url, max_bytes=max_bytes, timeout=timeout, policy=policy, local_file=local_file)
    return await decode(data, fit, threads=threads)


async def decode(data: bytes, fit: FitRule | None = None, *, threads: int | None = None) -> InputImage:
    """`decode_image` on the bounded decoding pool, off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_decode_pool(threads), _decode_and_release, data, fit)


def _decode_and_release(data: bytes, fit: FitRule | None) -> InputImage:
    try:
        return decode_image(data, fit)
    finally:
        if _malloc_trim is not None:
            # glibc keeps what a decode freed (tens of MB for a large image) in the decoding
            # thread's arena; hand it back, so a burst of image submits does not leave the API
            # process bloated (without this, status polls after 200 ~1 MP submits were ~10%
            # slower on the 2-core box of scripts/bench_status_inputs.py).
            _malloc_trim(0)


# glibc's malloc_trim; None elsewhere (musl, macOS), where there is nothing to do.
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)


def decode_threads(configured: int | None) -> int:
    """Threads decoding input images at once in one API process: the setting, else the cores."""
    return configured if configured is not None else max(1, os.cpu_count() or 1)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _decode_pool(threads: int | None) -> ThreadPoolExecutor:
    """The process's pool of `threads` decoding threads. Submits beyond that wait in its
    queue holding only their compressed bytes, not a decoded image's memory."""
    count = decode_threads(threads)
    with _pools_lock:
        pool = _pools.get(count)
        if pool is None:
            pool = _pools[count] = ThreadPoolExecutor(max_workers=count, thread_name_prefix="image-decode")
        return pool


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
        data = local_file(url, max_bytes + 1)
        if data is None:
            return None
    except StorageUnavailable:
        raise  # the bucket is down for now: a 503, not the client's fault
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


def decode_image(data: bytes, fit: FitRule | None = None) -> InputImage:
    """Check the header, decode, flatten to RGB, apply `fit`, re-encode as PNG."""
    try:
        # Image.open reads the header only: format and size are known before any decoding.
        with Image.open(io.BytesIO(data), formats=INPUT_FORMATS) as image:
            source_width, source_height = image.size
            if source_width * source_height > MAX_INPUT_PIXELS:
                raise InputImageError(
                    "image_too_large",
                    f"The image is {source_width}x{source_height}; at most {MAX_INPUT_PIXELS} pixels",
                )
            chosen = fit(source_width, source_height) if callable(fit) else fit
            rgb = image.convert("RGB")
    except InputImageError:
        raise
    except Image.DecompressionBombError:  # PIL's own header check, at twice its pixel limit
        raise InputImageError(
            "image_too_large", f"The image has more than {MAX_INPUT_PIXELS} pixels"
        ) from None
    except UnidentifiedImageError:
        formats = ", ".join(INPUT_FORMATS)
        message = f"The image could not be decoded: it is none of the accepted formats ({formats})"
        raise InputImageError("image_load_error", message) from None
    except (OSError, ValueError) as exc:
        raise InputImageError("image_load_error", f"The image could not be decoded: {exc}") from exc
    stored = chosen.apply(rgb) if chosen is not None else rgb
    out = io.BytesIO()
    # Fast compression: the PNG only travels from the API to the worker.
    stored.save(out, format="PNG", compress_level=1)
    return InputImage(
        png=out.getvalue(),
        width=stored.width,
        height=stored.height,
        source_width=source_width,
        source_height=source_height,
    )
