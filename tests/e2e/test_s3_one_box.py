"""Every fal flow on one box whose files live in a real bucket (SeaweedFS, credentials
enforced; `--storage-url s3://bucket/flux`, AWS_* variables as a deployment sets them): the
queue, `/run`, `/stream`, uploads from the real Python client (one request, initiate + PUT,
multipart) and from the real JS client (Blobs, Files, Blob inputs, multipart above 90 MB),
image-to-image from an uploaded file. Images are read from the bucket by presigned URL; the
box's own files directory stays empty."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from e2e_support import DEV, run_node_script, small_input
from PIL import Image

from server.tls import CertPaths
from tests.conftest import FluxServer, launch_server
from tests.s3_server import S3Server

pytestmark = pytest.mark.timeout(300)
PREFIX = "flux"


class Box:
    def __init__(self, server: FluxServer, s3: S3Server, bucket: str) -> None:
        self.server, self.s3, self.bucket = server, s3, bucket

    def objects(self) -> set[str]:
        return {key.removeprefix(f"{PREFIX}/") for key in self.s3.keys(self.bucket, f"{PREFIX}/")}

    def local_files(self) -> list[Path]:
        files_dir = self.server.data_dir / "files"
        return [p for p in files_dir.rglob("*") if p.is_file()] if files_dir.exists() else []

    def read(self, url: str) -> httpx.Response:
        """A returned URL as a client reads it: a bucket URL straight from the bucket."""
        assert url.startswith(f"{self.s3.endpoint}/{self.bucket}/{PREFIX}/"), url
        answer = httpx.get(url)
        assert answer.status_code == 200, answer.text
        return answer

    def check_image(self, output: dict, size: tuple[int, int] = (64, 64)) -> str:
        meta = output["images"][0]
        answer = self.read(meta["url"])
        assert answer.headers["content-type"] == meta["content_type"]
        assert Image.open(io.BytesIO(answer.content)).size == size == (meta["width"], meta["height"])
        name = urlsplit(meta["url"]).path.rsplit("/", 1)[-1]
        assert name in self.objects()
        return name


@pytest.fixture(scope="module")
def box(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, certs: CertPaths, s3_server: S3Server
) -> Iterator[Box]:
    bucket = s3_server.fresh_bucket()
    server = launch_server(
        tmp_path_factory.mktemp("s3-box"),
        tiny_model_dir=tiny_model_dir,
        certs=certs,
        args=["--storage-url", f"s3://{bucket}/{PREFIX}"],
        env=s3_server.env(),
    )
    yield Box(server, s3_server, bucket)
    with contextlib.suppress(AssertionError):
        server.stop()
    assert Box(server, s3_server, bucket).local_files() == []  # nothing was ever written locally


@pytest.fixture(scope="module")
def fal(box: Box, certs: CertPaths) -> Iterator[Any]:
    """The real fal_client, queue, run and upload hosts all pointed at the box."""
    base = box.server.base_url
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(certs.bundle))
        import fal_client
        import fal_client.client

        patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{base}/")
        patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{base}/run/")
        patch.setattr(fal_client.client, "REST_URL", base)
        patch.setattr(fal_client.client, "CDN_URL", base)
        yield fal_client


def test_the_queue_run_and_stream_return_images_read_from_the_bucket(box: Box, fal: Any) -> None:
    client = fal.SyncClient(key="anything")
    queued = client.subscribe(DEV, small_input(seed=1))
    name = box.check_image(queued)
    expires = parse_qs(urlsplit(queued["images"][0]["url"]).query)["X-Amz-Expires"]
    assert expires == ["86400"]  # valid as long as the result is kept (--retention-seconds)
    box.check_image(client.run(DEV, small_input(seed=2)))
    events = list(client.stream(DEV, small_input(seed=3, num_inference_steps=3)))
    box.check_image(events[-1])
    # The files route answers for a bucket file with a redirect to it.
    with box.server.client() as http:
        answer = http.get(f"/files/{name}")
        assert answer.status_code == 307 and answer.headers["location"].startswith(box.s3.endpoint)
    assert box.local_files() == []


def test_the_lifecycle_preference_of_a_submit_sets_its_urls_lifetime(box: Box, fal: Any) -> None:
    """fal's `X-Fal-Object-Lifecycle-Preference` on a submit (the JS client's
    `storageSettings`, fal_client's `headers=`): the image URLs expire when asked, never after
    the result is deleted; a malformed preference is the client's error."""
    client = fal.SyncClient(key="anything")
    for asked, expected in ((600, "600"), (10**9, "86400")):
        preference = f'{{"expiration_duration_seconds": {asked}}}'
        output = client.subscribe(
            DEV, small_input(seed=5), headers={"X-Fal-Object-Lifecycle-Preference": preference}
        )
        box.check_image(output)
        assert parse_qs(urlsplit(output["images"][0]["url"]).query)["X-Amz-Expires"] == [expected]
    with box.server.client() as http:
        answer = http.post(
            f"/{DEV}", json=small_input(), headers={"x-fal-object-lifecycle-preference": "soon"}
        )
    assert answer.status_code == 422 and "Invalid lifecycle" in answer.text


def test_python_client_uploads_land_in_the_bucket_and_feed_image_to_image(box: Box, fal: Any) -> None:
    client = fal.SyncClient(key="anything")
    picture = Image.new("RGB", (96, 64), (200, 80, 40))
    url = client.upload_image(picture, format="png")  # the CDN route: one request
    assert Image.open(io.BytesIO(box.read(url).content)).size == (96, 64)
    fallback = client.upload(b"initiate and put", "text/plain", file_name="n.txt", repository="fal")
    assert box.read(fallback).content == b"initiate and put"
    data = bytes(range(256)) * (12 * 4096) + b"tail"  # 12 MiB + 4: parts of 5, 5 and 2 MiB
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fal.client, "MULTIPART_THRESHOLD", 6 * 1024 * 1024)
        patch.setattr(fal.client, "MULTIPART_CHUNK_SIZE", 5 * 1024 * 1024)
        multipart = client.upload(data, "application/octet-stream", file_name="style.safetensors")
    # fal_client's multipart URL is this server's (it PUT the parts under it): a redirect.
    assert multipart.startswith(box.server.base_url + "/files/") and multipart.endswith(".safetensors")
    with box.server.client(follow_redirects=True) as http:
        assert http.get(multipart).content == data
    names = {urlsplit(u).path.rsplit("/", 1)[-1] for u in (url, fallback, multipart)}
    assert names <= box.objects()
    output = client.subscribe(
        "fal-ai/flux/dev/image-to-image",
        {"prompt": "at night", "image_url": url, "strength": 0.3, "num_inference_steps": 10, "seed": 4},
    )
    box.check_image(output, size=(96, 64))  # the uploaded picture's size: it was the input
    assert box.local_files() == []


def test_the_js_client_uploads_land_in_the_bucket(box: Box) -> None:
    out = run_node_script(box.server, "uploads.mjs", FAL_MODE="proxy", FAL_BIG="1")
    for key, sha in (("blob", out["pictureSha256"]), ("file", out["file"]["maskSha256"])):
        assert out[key]["url"].startswith(f"{box.s3.endpoint}/{box.bucket}/{PREFIX}/")
        assert out[key]["status"] == 200 and out[key]["sha256"] == sha
        assert out[key]["contentType"] == "image/png"
    # The lifecycle preference (60 s) is the presigned URL's lifetime.
    assert parse_qs(urlsplit(out["lifecycle"]["url"]).query)["X-Amz-Expires"] in (["60"], ["59"])
    box.check_image(out["imageToImage"]["data"], size=(96, 64))  # a Blob input, uploaded first
    box.check_image(out["redux"]["data"])
    big = out["big"]  # ten 10 MB parts: the bucket's own multipart upload
    assert big["served"]["status"] == 200 and big["served"]["size"] == 91 * 1024 * 1024 + 123
    assert big["served"]["sha256"] == big["sha256"]
    assert not any(key.startswith(".reservations/") for key in box.objects())
    assert box.local_files() == []
    assert not any((box.server.data_dir / "upload-spool").iterdir())  # spooled bodies are gone
