"""The real JavaScript client's uploads (@fal-ai/client 1.10.1 under Node): `fal.storage.upload`
of a Blob and a File, Blob inputs that `subscribe` and `queue.submit` upload by themselves, a
lifecycle, multipart above 90 MB, and a refused key. tests/e2e/js/uploads.mjs drives the client;
this file asserts on what it printed and on what the server stored."""

from __future__ import annotations

import pytest
from e2e_support import AUTH_KEY, check_output, run_node_script

pytestmark = pytest.mark.timeout(240)


def run_uploads(server, mode: str, **env: str) -> dict:
    return run_node_script(server, "uploads.mjs", FAL_MODE=mode, **env)


@pytest.fixture(scope="module", params=["proxy", "middleware"])
def uploads(request: pytest.FixtureRequest, flux_server) -> dict:
    # The multipart run (91 MB) once, in proxy mode: the browser's way.
    big = {"FAL_BIG": "1"} if request.param == "proxy" else {}
    return run_uploads(flux_server, request.param, **big)


def test_blob_and_file_uploads_are_served_as_sent(uploads: dict, flux_server) -> None:
    for key, sha in (("blob", uploads["pictureSha256"]), ("file", uploads["file"]["maskSha256"])):
        stored = uploads[key]
        assert stored["url"].startswith(flux_server.base_url + "/files/"), stored
        assert stored["status"] == 200 and stored["sha256"] == sha
        assert stored["contentType"] == "image/png"
    assert uploads["file"]["url"].endswith(".png")


def test_the_lifecycle_preference_shortens_the_lifetime(uploads: dict) -> None:
    max_age = int(uploads["lifecycle"]["cacheControl"].split("max-age=")[1].split(",")[0])
    assert 0 < max_age <= 60
    # Without one: the retention time (24 h by default).
    assert int(uploads["blob"]["cacheControl"].split("max-age=")[1].split(",")[0]) > 23 * 3600


def test_blob_inputs_are_uploaded_by_subscribe_and_queue_submit(uploads: dict, flux_server) -> None:
    with flux_server.client() as client:
        # image-to-image follows the uploaded picture's size: the Blob really was the input.
        check_output(client, uploads["imageToImage"]["data"], size=(96, 64))
        check_output(client, uploads["redux"]["data"])
    assert uploads["imageToImage"]["data"]["seed"] == 7 and uploads["redux"]["data"]["seed"] == 8


def test_multipart_upload_above_90_mb(uploads: dict, flux_server) -> None:
    if uploads["mode"] != "proxy":
        assert "big" not in uploads
        return
    big = uploads["big"]
    assert big["url"].startswith(flux_server.base_url + "/files/")
    assert big["served"]["status"] == 200
    assert big["served"]["size"] == 91 * 1024 * 1024 + 123 and big["served"]["sha256"] == big["sha256"]
    # Ten 10 MB parts, assembled: nothing of the parts is left behind.
    files_dir = flux_server.data_dir / "files"
    assert not any((files_dir / ".parts").glob("*/*")), list((files_dir / ".parts").glob("*/*"))


def test_a_wrong_key_is_refused(auth_server) -> None:
    refused = run_uploads(auth_server, "proxy", FAL_CREDENTIALS="wrong", FAL_EXPECT_REFUSAL="1")["refused"]
    assert refused == {"thrown": True, "isApiError": True, "status": 401}
    accepted = run_uploads(auth_server, "proxy", FAL_CREDENTIALS=AUTH_KEY, FAL_EXPECT_REFUSAL="1")
    assert accepted["refused"] == {"thrown": False}
