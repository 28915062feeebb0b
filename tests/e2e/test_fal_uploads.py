"""The real Python client's uploads (fal_client 1.0.3) against the shared TLS server:
`upload_file`, `upload_image` and `upload` then image-to-image and redux on the uploaded
URL, the initiate-and-PUT fallback, multipart (the client's threshold lowered), a lifecycle,
the async client, a refused key; and the one documented line that points the client's upload
host here, taken from docs/api/fal.md and run in a fresh interpreter. Also one real-client
check of the aggregator path's extra values."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_support import AUTH_KEY, check_output, fetch_image
from PIL import Image

pytestmark = pytest.mark.timeout(180)

DOC = Path(__file__).resolve().parents[2] / "docs" / "api" / "fal.md"
# The documented line; the test replaces only the URL in it.
LINE = re.compile(r'^fal_client\.client\.REST_URL = fal_client\.client\.CDN_URL = "[^"]+"$', re.MULTILINE)


def documented_line(base_url: str) -> str:
    lines = LINE.findall(DOC.read_text())
    assert lines, f"{DOC} no longer documents the upload-host line"
    assert len(set(lines)) == 1, lines  # one line, the same wherever it is shown
    return re.sub(r'"[^"]+"$', f'"{base_url}"', lines[0])


def picture(size: tuple[int, int] = (96, 64)) -> Image.Image:
    image = Image.new("RGB", size, (200, 80, 40))
    image.paste((30, 120, 220), (0, 0, size[0] // 2, size[1]))
    return image


def png_file(tmp_path: Path, size: tuple[int, int] = (96, 64)) -> Path:
    path = tmp_path / "input.png"
    picture(size).save(path, format="PNG")
    return path


@pytest.fixture
def uploads_here(flux_server, fal) -> Iterator:
    """The client's upload hosts pointed at the server (what the documented line does), and a
    fresh client: the token manager keeps the URL it saw first."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fal.module.client, "REST_URL", flux_server.base_url)
        patch.setattr(fal.module.client, "CDN_URL", flux_server.base_url)
        yield fal.module.SyncClient()


def served_bytes(flux_server, url: str) -> httpx.Response:
    assert url.startswith(flux_server.base_url + "/files/"), url
    with flux_server.client() as client:
        response = client.get(url)
    assert response.status_code == 200, response.text
    return response


def test_the_documented_line_points_a_fresh_client_here(flux_server, fal, tmp_path) -> None:
    line = documented_line(flux_server.base_url)
    path = png_file(tmp_path)
    script = textwrap.dedent(
        f"""
        import json, fal_client
        from PIL import Image
        {line}
        url = fal_client.upload_file({str(path)!r})
        image_url = fal_client.upload_image(Image.open({str(path)!r}), format="png")
        data_url = fal_client.upload(b"plain bytes", "application/octet-stream", file_name="notes.bin")
        out = fal_client.subscribe("fal-ai/flux/dev/image-to-image", {{"prompt": "at night",
            "image_url": url, "num_inference_steps": 10, "strength": 0.5, "seed": 3}})
        print(json.dumps({{"urls": [url, image_url, data_url], "output": out}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAL_")}
    env.update(fal.env)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- server log ---\n{flux_server.log()[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    file_url, image_url, data_url = result["urls"]
    assert served_bytes(flux_server, file_url).content == path.read_bytes()
    assert served_bytes(flux_server, image_url).headers["content-type"] == "image/png"
    stored = served_bytes(flux_server, data_url)
    assert stored.content == b"plain bytes" and data_url.endswith(".bin")
    with flux_server.client() as client:
        check_output(client, result["output"], size=(96, 64))  # the uploaded picture's size


def test_upload_image_then_redux_and_image_to_image(flux_server, uploads_here) -> None:
    url = uploads_here.upload_image(picture((80, 64)))  # jpeg by default
    response = served_bytes(flux_server, url)
    assert response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (80, 64)
    redux = uploads_here.subscribe(
        "fal-ai/flux-1/dev/redux",
        {"image_url": url, "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "seed": 4},
    )
    i2i = uploads_here.run(
        "fal-ai/flux/dev/image-to-image",
        {"prompt": "p", "image_url": url, "num_inference_steps": 10, "strength": 0.3, "seed": 5},
    )
    with flux_server.client() as client:
        check_output(client, redux)
        check_output(client, i2i, size=(80, 64))


def test_the_initiate_and_put_fallback(flux_server, uploads_here, tmp_path) -> None:
    path = png_file(tmp_path)
    # repository="fal": the path the client falls back to when its CDN upload fails.
    url = uploads_here.upload(path.read_bytes(), "image/png", file_name="x.png", repository="fal")
    assert served_bytes(flux_server, url).content == path.read_bytes()


def test_multipart_upload(flux_server, uploads_here, fal) -> None:
    data = bytes(range(256)) * 2400 + b"tail"  # 614 404 bytes: seven 90 KB parts
    with pytest.MonkeyPatch.context() as patch:
        # The real threshold is 100 MB; lowered, the same code path runs on a small file.
        patch.setattr(fal.module.client, "MULTIPART_THRESHOLD", 256 * 1024)
        patch.setattr(fal.module.client, "MULTIPART_CHUNK_SIZE", 90 * 1024)
        url = uploads_here.upload(data, "application/octet-stream", file_name="weights.safetensors")
    assert url.endswith(".safetensors")
    assert served_bytes(flux_server, url).content == data
    assert not any((flux_server.data_dir / "files" / ".parts").glob("*/*"))


def test_a_lifecycle_sets_the_lifetime(flux_server, uploads_here, fal, tmp_path) -> None:
    settings = fal.module.StorageSettings(expires_in="1h")
    url = uploads_here.upload_file(png_file(tmp_path), lifecycle=settings)
    max_age = int(served_bytes(flux_server, url).headers["cache-control"].split("max-age=")[1].split(",")[0])
    assert 3500 < max_age <= 3600


def test_the_async_client_uploads_too(flux_server, uploads_here, fal) -> None:
    async def scenario() -> str:
        return await fal.module.AsyncClient().upload(b"async bytes", "text/plain", file_name="a.txt")

    url = asyncio.run(scenario())
    assert served_bytes(flux_server, url).content == b"async bytes"


def test_keys_guard_uploads(auth_server, fal) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fal.module.client, "REST_URL", auth_server.base_url)
        patch.setattr(fal.module.client, "CDN_URL", auth_server.base_url)
        with pytest.raises(httpx.HTTPStatusError) as caught:
            fal.module.SyncClient(key="wrong").upload(b"x", "text/plain")
        assert caught.value.response.status_code == 401
        url = fal.module.SyncClient(key=AUTH_KEY).upload(b"with the key", "text/plain")
    assert url.startswith(auth_server.base_url + "/files/")
    with auth_server.client() as client:
        assert client.get(url).content == b"with the key"  # files are public, like fal's CDN


def test_aggregator_values_with_the_real_client(flux_server, fal) -> None:
    output = fal.sync.run(
        "fal-ai/flux-1/dev",
        {
            "prompt": "a tiger eye",
            "image_size": "16:9",
            "output_format": "JPEG",
            "acceleration": "default",
            "num_inference_steps": 1,
            "seed": 9,
        },
    )
    assert (output["images"][0]["width"], output["images"][0]["height"]) == (1024, 576)
    assert output["images"][0]["content_type"] == "image/jpeg"
    # The path's default is "regular"; a CPU server has only "none" enabled and says so.
    assert output["acceleration"] == "none" and "'regular'" in output["acceleration_note"]
    with flux_server.client() as client:
        image, _ = fetch_image(client, output["images"][0]["url"])
    assert image.size == (1024, 576) and image.format == "JPEG"
    with pytest.raises(fal.module.FalClientHTTPError) as caught:
        fal.sync.run("fal-ai/flux/dev", {"prompt": "p", "image_size": "16:9"})
    assert caught.value.status_code == 422  # fal's own path stays strict


def test_the_size_limit_reaches_the_client_as_a_clear_413(start_flux_server, fal) -> None:
    server = start_flux_server(args=["--max-upload-bytes", "1000"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fal.module.client, "REST_URL", server.base_url)
        patch.setattr(fal.module.client, "CDN_URL", server.base_url)
        client = fal.module.SyncClient()
        assert client.upload(b"x" * 1000, "text/plain").startswith(server.base_url + "/files/")
        # Over the limit the CDN upload and then the fallback are refused: the client raises.
        with pytest.raises(fal.module.FalClientHTTPError) as caught:
            client.upload(b"x" * 1001, "text/plain")
    assert caught.value.status_code == 413
    assert "limit of 1000 bytes" in caught.value.message
