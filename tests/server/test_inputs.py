"""Input images: data URIs and http(s) URLs, size limits, timeouts, decoding."""

from __future__ import annotations

import base64
import io
import socket
import threading

import pytest
from PIL import Image

from server.config import Settings
from server.fetch import FetchPolicy
from server.inputs import InputImageError, load_image
from server.storage import LocalStorage
from tests.server.conftest import png_bytes

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

    def local_file(url: str):
        return storage.own_file(url, [base])

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
