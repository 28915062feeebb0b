"""Input images: data URIs and http(s) URLs, size limits, timeouts, decoding, the header
check, shrinking to what the model uses, and the bounded decoding pool."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from server.api import inputs
from server.api.inputs import (
    REDUX_FIT,
    InputImageError,
    decode,
    decode_image,
    decode_threads,
    load_image,
    mask_fit,
    target_fit,
)
from server.config import Settings
from server.fetch import FetchPolicy
from server.jobs import REDUX_INPUT_SIDE
from server.storage import LocalStorage
from tests.server.conftest import png_bytes
from tests.support import png_header_only, wait_until

DEFAULT_POLICY = FetchPolicy.from_settings(Settings())

MB = 1024 * 1024


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def jpeg_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, format="JPEG")
    return out.getvalue()


@pytest.mark.anyio
async def test_data_uris_decode_to_png():
    image = await load_image(
        data_uri(jpeg_bytes(33, 21), "image/jpeg"), max_bytes=MB, timeout=1, policy=DEFAULT_POLICY
    )
    assert (image.width, image.height) == (33, 21)
    decoded = Image.open(io.BytesIO(image.png))
    assert decoded.format == "PNG" and decoded.mode == "RGB" and decoded.size == (33, 21)
    rgba = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(rgba, format="PNG")
    assert (
        await load_image(data_uri(rgba.getvalue()), max_bytes=MB, timeout=1, policy=DEFAULT_POLICY)
    ).width == 4


@pytest.mark.parametrize(
    ("url", "error_type"),
    [
        ("data:image/png;base64,AAAA", "image_load_error"),
        ("data:text/plain,hello", "image_load_error"),
        ("data:image/png;base64", "image_load_error"),
        ("ftp://example.com/a.png", "file_download_error"),
        ("/etc/passwd", "file_download_error"),
        ("file:///etc/passwd", "file_download_error"),
    ],
)
@pytest.mark.anyio
async def test_bad_inputs_have_fal_error_types(url, error_type):
    with pytest.raises(InputImageError) as caught:
        await load_image(url, max_bytes=MB, timeout=1, policy=DEFAULT_POLICY)
    assert caught.value.error_type == error_type


@pytest.mark.anyio
async def test_size_limit_applies_to_data_uris():
    with pytest.raises(InputImageError) as caught:
        await load_image(data_uri(png_bytes(300, 300)), max_bytes=100, timeout=1, policy=DEFAULT_POLICY)
    assert caught.value.error_type == "file_too_large"


@pytest.mark.anyio
async def test_http_urls_are_downloaded_with_limits(api):
    name = LocalStorage(api.settings.files_dir).save(png_bytes(40, 24), "png")
    url = f"{api.base_url}/files/{name}"
    image = await load_image(url, max_bytes=MB, timeout=5, policy=DEFAULT_POLICY)
    assert (image.width, image.height) == (40, 24)
    with pytest.raises(InputImageError) as caught:
        await load_image(url, max_bytes=50, timeout=5, policy=DEFAULT_POLICY)
    assert caught.value.error_type == "file_too_large"
    with pytest.raises(InputImageError) as caught:
        await load_image(
            f"{api.base_url}/files/{'A' * 32}.png", max_bytes=MB, timeout=5, policy=DEFAULT_POLICY
        )
    assert caught.value.error_type == "file_download_error"


@pytest.mark.anyio
async def test_slow_servers_time_out():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True)
    thread.start()
    try:
        with pytest.raises(InputImageError) as caught:
            await load_image(
                f"http://127.0.0.1:{silent.getsockname()[1]}/x.png",
                max_bytes=MB,
                timeout=0.3,
                policy=DEFAULT_POLICY,
            )
        assert caught.value.error_type == "file_download_error"
    finally:
        for conn in accepted:
            conn.close()
        silent.close()


@pytest.mark.anyio
async def test_our_own_file_urls_are_read_from_the_disk(tmp_path):
    storage = LocalStorage(tmp_path / "files")
    name = storage.save(png_bytes(40, 24), "png")
    # A base URL nothing listens on: the image can only come from the disk.
    base = "http://127.0.0.1:9"

    def local_file(url: str, max_bytes: int):
        return storage.read_own(url, [base], max_bytes)

    image = await load_image(
        f"{base}/files/{name}", max_bytes=MB, timeout=1, policy=DEFAULT_POLICY, local_file=local_file
    )
    assert (image.width, image.height) == (40, 24)
    with pytest.raises(InputImageError) as caught:
        await load_image(
            f"{base}/files/{name}", max_bytes=50, timeout=1, policy=DEFAULT_POLICY, local_file=local_file
        )
    assert caught.value.error_type == "file_too_large"
    storage.delete(name)
    with pytest.raises(InputImageError) as caught:
        await load_image(
            f"{base}/files/{name}", max_bytes=MB, timeout=1, policy=DEFAULT_POLICY, local_file=local_file
        )
    assert (
        caught.value.error_type == "file_download_error"
        and "not found on this server" in caught.value.message
    )


# --- bounded: the header first, a fit to what the model uses, a bounded decoding pool --------


@pytest.mark.parametrize("side", [20000, 9000])  # over PIL's own bomb limit, and only over ours
def test_an_oversize_image_is_refused_by_its_header_without_decoding(side: int) -> None:
    data = png_header_only(side, side)
    assert len(data) < 100
    started = time.perf_counter()
    with pytest.raises(InputImageError) as caught:
        decode_image(data, target_fit(1024, 1024))
    assert caught.value.error_type == "image_too_large", caught.value.message
    assert time.perf_counter() - started < 1.0
    # The same header at an acceptable size reaches the decoder, which finds no pixels.
    with pytest.raises(InputImageError) as small:
        decode_image(png_header_only(64, 64))
    assert small.value.error_type == "image_load_error"


def test_formats_outside_the_accepted_list_are_refused_unread() -> None:
    ppm = b"P6\n4 4\n255\n" + bytes(48)  # a format PIL reads, but not one clients send
    assert Image.open(io.BytesIO(ppm)).size == (4, 4)
    with pytest.raises(InputImageError) as caught:
        decode_image(ppm)
    assert caught.value.error_type == "image_load_error" and "PNG, JPEG, WEBP" in caught.value.message


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_shrinking_at_submit_gives_the_model_the_same_pixels() -> None:
    """What the runtime feeds the pipelines (models/runtime.py opens the stored PNG as RGB;
    diffusers' processors resize it to the job's size, SigLIP's to 384 px) is the same for
    the image shrunk at submit as for the image as sent, on every task: the size at submit
    is the size the model resizes to, with the model's own filter."""
    from diffusers.image_processor import VaeImageProcessor
    from transformers import SiglipImageProcessor

    from models.runtime import _open_image

    image = encoded(noise((300, 200), "RGBA"))  # another aspect than the target's, and alpha
    images = VaeImageProcessor(vae_scale_factor=16, vae_latent_channels=16)
    stored = decode_image(image, target_fit(96, 64))
    assert (stored.width, stored.height, stored.source_width, stored.source_height) == (96, 64, 300, 200)
    assert torch.equal(
        images.preprocess(_open_image(stored.png), height=64, width=96),
        images.preprocess(_open_image(decode_image(image).png), height=64, width=96),
    )

    mask = encoded(noise((250, 170), seed=1), "JPEG")
    masks = VaeImageProcessor(
        vae_scale_factor=16,
        vae_latent_channels=16,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )
    stored_mask = decode_image(mask, mask_fit(96, 64))
    assert Image.open(io.BytesIO(stored_mask.png)).mode == "L" and (
        stored_mask.width,
        stored_mask.height,
    ) == (
        96,
        64,
    )
    assert torch.equal(
        masks.preprocess(_open_image(stored_mask.png), height=64, width=96),
        masks.preprocess(_open_image(decode_image(mask).png), height=64, width=96),
    )

    redux = encoded(noise((500, 300), seed=2), "JPEG")
    siglip = SiglipImageProcessor(size={"height": REDUX_INPUT_SIDE, "width": REDUX_INPUT_SIDE})
    stored_redux = decode_image(redux, REDUX_FIT)
    assert (stored_redux.width, stored_redux.height) == (384, 384)

    def encoder_input(png: bytes) -> torch.Tensor:
        # FluxPriorReduxPipeline's own call of its feature extractor.
        return siglip.preprocess(
            images=_open_image(png), do_resize=True, return_tensors="pt", do_convert_rgb=True
        )["pixel_values"]

    assert torch.equal(encoder_input(stored_redux.png), encoder_input(decode_image(redux).png))


def test_images_smaller_than_the_fit_are_stored_as_sent() -> None:
    small = decode_image(encoded(noise((80, 40))), target_fit(96, 64))
    assert (small.width, small.height) == (80, 40)
    mask = decode_image(encoded(noise((80, 40))), mask_fit(96, 64))
    assert Image.open(io.BytesIO(mask.png)).mode == "RGB"  # the model resizes it before graying
    # Larger in one dimension only: resized to the fit, as the model would.
    assert (
        decode_image(encoded(noise((200, 40))), target_fit(96, 64)).png
        == decode_image(encoded(noise((200, 40)).resize((96, 64), Image.Resampling.LANCZOS))).png
    )


def test_a_fit_computed_from_the_header_may_refuse_the_image() -> None:
    def refuse_wide(width: int, height: int):
        if width > 2 * height:
            raise InputImageError("image_too_large", f"{width}x{height} is too wide")
        return target_fit(width, height)

    with pytest.raises(InputImageError, match="300x100 is too wide"):
        decode_image(encoded(noise((300, 100))), refuse_wide)
    assert decode_image(encoded(noise((100, 100))), refuse_wide).width == 100


@pytest.mark.anyio
async def test_decoding_runs_on_at_most_the_configured_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    release = threading.Event()
    active, most, threads_used = 0, 0, set()

    def held_decode(data: bytes, fit: object) -> str:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
            threads_used.add(threading.current_thread().name)
        release.wait(30)
        with lock:
            active -= 1
        return "decoded"

    monkeypatch.setattr(inputs, "decode_image", held_decode)
    burst = asyncio.gather(*(decode(b"image", None, threads=2) for _ in range(6)))
    await asyncio.to_thread(wait_until, lambda: active == 2, 10, "two decodes running")
    release.set()
    assert await burst == ["decoded"] * 6
    assert most == 2 and len(threads_used) == 2
    assert decode_threads(None) == os.cpu_count() and decode_threads(3) == 3
