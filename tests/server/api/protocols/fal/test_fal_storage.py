"""fal's storage protocol over real HTTP, request by request as the real clients send them
(the clients themselves run in tests/e2e): tokens, one-request uploads, initiate + PUT,
multipart in both clients' shapes, lifecycles, the size limit, API keys, the JS proxy, and an
upload used as an input image."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest
from PIL import Image

from server.jobs import cancelled_error
from server.storage import LocalStorage
from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server

KEY = "upload-key"
SMALL_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """Auth on, a small upload limit and a short maximum lifetime."""
    settings = api_settings(
        tmp_path_factory.mktemp("api-storage"),
        api_key=[KEY],
        max_upload_bytes=SMALL_LIMIT,
        retention_seconds=3600,
        max_upload_retention_seconds=7200,
    )
    with run_api_server(settings) as server:
        yield server


def auth(key: str = KEY) -> dict[str, str]:
    return {"authorization": f"Key {key}"}


def served(api: ApiServer, url: str) -> httpx.Response:
    assert url.startswith(api.base_url + "/files/"), url
    return api.client.get(url)


def expires_in(api: ApiServer, url: str) -> float:
    info = LocalStorage(api.settings.files_dir).file_info(url.rsplit("/", 1)[1])
    assert info is not None and info.expires_at is not None
    return info.expires_at - time.time()


def test_token_is_the_callers_key_with_an_aware_expiry_and_this_servers_base(secured):
    response = secured.client.post("/storage/auth/token?storage_type=fal-cdn-v3", json={}, headers=auth())
    assert response.status_code == 200, response.text
    token = response.json()
    assert (token["token"], token["token_type"], token["base_url"]) == (KEY, "Key", secured.base_url)
    expires = datetime.fromisoformat(token["expires_at"])
    assert expires.tzinfo is not None and expires > datetime.now(timezone.utc)


def test_one_request_upload_is_served_with_its_content_type(secured):
    data = b"\x00safetensors-ish\xff" * 100
    response = secured.client.post(
        "/files/upload",
        content=data,
        headers={
            **auth(),
            "content-type": "application/octet-stream",
            "x-fal-file-name": "style.safetensors",
        },
    )
    assert response.status_code == 200, response.text
    url = response.json()["access_url"]
    assert url.endswith(".safetensors")  # loaders look at the extension
    got = served(secured, url)
    assert got.status_code == 200 and got.content == data
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-security-policy"] == "sandbox"
    assert got.headers["x-content-type-options"] == "nosniff"
    # No lifecycle header: it lives for the retention time.
    assert 3500 < expires_in(secured, url) <= 3600
    assert 3500 < int(got.headers["cache-control"].split("max-age=")[1].split(",")[0]) <= 3600


def test_initiate_then_put_without_credentials(secured):
    response = secured.client.post(
        "/storage/upload/initiate?storage_type=fal-cdn-v3",
        json={"content_type": "image/png", "file_name": "cat.png"},
        headers=auth(),
    )
    assert response.status_code == 200, response.text
    urls = response.json()
    # The file's URL is signed (auth is on); the upload URL is the plain file path + the upload id.
    name = urls["file_url"].rsplit("/", 1)[1]
    assert urls["upload_url"].startswith(f"{secured.base_url}/files/{name}/upload/")
    assert served(secured, urls["file_url"]).status_code == 404  # nothing until the bytes arrive
    data = png_bytes(8, 8)
    put = httpx.put(urls["upload_url"], content=data, headers={"content-type": "image/png"})
    assert put.status_code == 200, put.text
    got = served(secured, urls["file_url"])
    assert got.content == data and got.headers["content-type"] == "image/png"
    # The upload URL is good for one file: sending again, or to another name, is refused.
    assert httpx.put(urls["upload_url"], content=b"again").status_code == 404
    other = urls["upload_url"].replace(urls["file_url"].rsplit("/", 1)[1], "A" * 32 + ".png")
    assert httpx.put(other, content=b"x").status_code == 404


def test_python_style_multipart_upload(secured):
    start = secured.client.post(
        "/files/upload/multipart",
        headers={**auth(), "content-type": "image/webp", "x-fal-file-name": "big.webp"},
    )
    assert start.status_code == 200, start.text
    access_url, upload_id = start.json()["access_url"], start.json()["uploadId"]
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * 10]
    parts = []
    for number in (3, 1, 2):  # the client sends parts concurrently, in any order
        put = httpx.put(
            f"{access_url}/multipart/{upload_id}/{number}", content=chunks[number - 1], headers=auth()
        )
        assert put.status_code == 200, put.text
        assert put.json() == {"partNumber": number, "etag": put.headers["etag"]}
        parts.append({"partNumber": number, "etag": put.headers["etag"]})
    complete_url = f"{access_url}/multipart/{upload_id}/complete"
    wrong = [dict(part, etag="0" * 32) if part["partNumber"] == 2 else part for part in parts]
    assert httpx.post(complete_url, json={"parts": wrong}).status_code == 400
    assert httpx.post(complete_url, json={"parts": parts[:1] + parts[2:]}).status_code == 400  # a gap
    done = httpx.post(complete_url, json={"parts": parts}, headers=auth())
    assert done.status_code == 200, done.text
    got = served(secured, access_url)
    assert got.content == b"".join(chunks) and got.headers["content-type"] == "image/webp"
    assert httpx.post(complete_url, json={"parts": parts}).status_code == 404  # finished


def test_js_style_multipart_upload(secured):
    response = secured.client.post(
        "/storage/upload/initiate-multipart?storage_type=fal-cdn-v3",
        json={"content_type": "image/jpeg", "file_name": "1700000000.jpeg"},
        headers=auth(),
    )
    assert response.status_code == 200, response.text
    upload_url, file_url = response.json()["upload_url"], response.json()["file_url"]
    answers = [httpx.put(f"{upload_url}/{n}", content=bytes([n]) * 500).json() for n in (1, 2)]
    done = httpx.post(f"{upload_url}/complete", json={"parts": answers})
    assert done.status_code == 200, done.text
    assert served(secured, file_url).content == b"\x01" * 500 + b"\x02" * 500


def test_lifecycle_header_sets_the_lifetime_within_the_maximum(secured):
    def upload(lifecycle: str) -> httpx.Response:
        headers = {**auth(), "content-type": "text/plain", "x-fal-object-lifecycle": lifecycle}
        return secured.client.post("/files/upload", content=b"x", headers=headers)

    short = upload('{"expiration_duration_seconds": 60}').json()["access_url"]
    assert 50 < expires_in(secured, short) <= 60
    capped = upload('{"expiration_duration_seconds": 31536000}').json()["access_url"]
    assert 7100 < expires_in(secured, capped) <= 7200  # max_upload_retention_seconds
    initiated = secured.client.post(
        "/storage/upload/initiate",
        json={"content_type": "text/plain", "file_name": "a.txt"},
        headers={**auth(), "x-fal-object-lifecycle-preference": '{"expiration_duration_seconds": 120}'},
    ).json()
    httpx.put(initiated["upload_url"], content=b"y").raise_for_status()
    assert 110 < expires_in(secured, initiated["file_url"]) <= 120
    for bad in ("not json", '{"expiration_duration_seconds": -5}', '{"expiration_duration_seconds": "1h"}'):
        response = upload(bad)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["header", "x-fal-object-lifecycle"]


def test_expired_uploads_are_gone_from_the_route_and_the_disk(secured):
    url = secured.client.post("/files/upload", content=b"short-lived", headers=auth()).json()["access_url"]
    storage = LocalStorage(secured.settings.files_dir)
    name = url.rsplit("/", 1)[1]
    assert storage.file_info(name, now=time.time() + 3601) is None  # served no longer after expiry
    assert storage.purge_uploads(now=time.time() + 3601) >= 1
    assert served(secured, url).status_code == 404
    assert not (secured.settings.files_dir / name).exists()


def test_the_size_limit_is_a_clear_413(secured):
    too_big = b"z" * (SMALL_LIMIT + 1)
    declared = secured.client.post("/files/upload", content=too_big, headers=auth())
    assert declared.status_code == 413
    assert f"{SMALL_LIMIT} bytes" in declared.json()["detail"]

    def chunked():  # no Content-Length: the limit applies while receiving
        yield too_big[:SMALL_LIMIT]
        yield too_big[SMALL_LIMIT:]

    streamed = secured.client.post("/files/upload", content=chunked(), headers=auth())
    assert streamed.status_code == 413
    initiated = secured.client.post("/storage/upload/initiate", json={}, headers=auth()).json()
    assert httpx.put(initiated["upload_url"], content=too_big).status_code == 413
    # Multipart: the parts together may not exceed the limit either.
    start = secured.client.post("/files/upload/multipart", headers=auth()).json()
    base = f"{start['access_url']}/multipart/{start['uploadId']}"
    assert httpx.put(f"{base}/1", content=too_big[: SMALL_LIMIT - 10]).status_code == 200
    assert httpx.put(f"{base}/2", content=b"0123456789X").status_code == 413
    leftovers = [p for p in (secured.settings.files_dir / ".tmp").iterdir()]
    assert leftovers == []  # refused bodies are not kept


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/storage/auth/token"),
        ("POST", "/files/upload"),
        ("POST", "/files/upload/multipart"),
        ("POST", "/storage/upload/initiate"),
        ("POST", "/storage/upload/initiate-multipart"),
    ],
)
def test_starting_an_upload_needs_an_api_key(secured, method, path):
    files_dir = secured.settings.files_dir
    before = sorted(p.name for p in files_dir.rglob("*"))
    for headers in ({}, auth("wrong")):
        response = secured.client.request(method, path, json={}, headers=headers)
        assert response.status_code == 401, (path, response.text)
        assert "detail" in response.json()
    assert sorted(p.name for p in files_dir.rglob("*")) == before  # nothing reserved or stored


def test_unknown_upload_ids_are_404(secured):
    name = "A" * 32 + ".png"
    for method, path in [
        ("PUT", f"/files/{name}/upload/{'B' * 43}"),
        ("PUT", f"/files/{name}/multipart/{'B' * 43}/1"),
        ("POST", f"/files/{name}/multipart/{'B' * 43}/complete"),
    ]:
        response = secured.client.request(method, path, content=b"{}")
        assert response.status_code == 404, (path, response.text)
    # An encoded traversal matches no upload route at all.
    traversal = secured.client.put(f"/files/{name}/upload/..%2F..%2Fqueue.sqlite3", content=b"x")
    assert traversal.status_code in (404, 405)


def test_the_js_proxy_reaches_the_storage_routes_only(secured):
    proxied = secured.client.post(
        "/api/fal/proxy",
        json={"content_type": "image/png", "file_name": "x.png"},
        headers={
            **auth(),
            "x-fal-target-url": "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
        },
    )
    assert proxied.status_code == 200, proxied.text
    assert set(proxied.json()) == {"upload_url", "file_url"}
    other = secured.client.post(
        "/api/fal/proxy",
        json={"prompt": "p"},
        headers={**auth(), "x-fal-target-url": "https://rest.fal.ai/fal-ai/flux/dev"},
    )
    assert other.status_code == 400
    assert secured.worker.depth() == 0


def test_an_upload_is_an_input_image_read_from_the_disk(secured):
    picture = io.BytesIO()
    Image.new("RGB", (100, 70), (1, 2, 3)).save(picture, format="JPEG")
    url = secured.client.post(
        "/files/upload", content=picture.getvalue(), headers={**auth(), "content-type": "image/jpeg"}
    ).json()["access_url"]
    submit = secured.client.post(
        "/fal-ai/flux/dev/image-to-image", json={"prompt": "p", "image_url": url}, headers=auth()
    )
    assert submit.status_code == 200, submit.text
    record = secured.claim(submit.json()["request_id"])
    job = record.job
    assert (job.width, job.height) == (96, 64) and job.image is not None and job.image.startswith(b"\x89PNG")
    secured.fail(record, cancelled_error())
    # Gone (expired or deleted): a clear 422 naming the cause, no HTTP round trip to ourselves.
    LocalStorage(secured.settings.files_dir).delete(url.rsplit("/", 1)[1])
    gone = secured.client.post("/fal-ai/flux/dev/redux", json={"image_url": url}, headers=auth())
    assert gone.status_code == 422, gone.text
    [error] = gone.json()["detail"]
    assert error["type"] == "file_download_error" and "not found on this server" in error["msg"]


def test_generated_images_are_still_served_by_extension(secured):
    name = LocalStorage(secured.settings.files_dir).save(png_bytes(4, 4), "png")
    signature = secured.app.state.url_signer.segment(name)  # auth is on: URLs are signed
    got = secured.client.get(f"/files/{signature}/{name}")
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == png_bytes(4, 4)


def test_the_api_purges_expired_uploads_by_itself(tmp_path):
    # Retention 2 s: uploads live 2 s and the maintenance loop sweeps every second.
    with run_api_server(api_settings(tmp_path / "data", retention_seconds=2)) as api:
        url = api.client.post("/files/upload", content=b"soon gone").json()["access_url"]
        path = api.settings.files_dir / url.rsplit("/", 1)[1]
        assert path.read_bytes() == b"soon gone"
        deadline = time.monotonic() + 30
        while path.exists():
            assert time.monotonic() < deadline, "the upload was not purged"
            time.sleep(0.05)
        assert served(api, url).status_code == 404
        assert list((api.settings.files_dir / ".meta").iterdir()) == []
