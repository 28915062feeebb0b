"""The API with object storage whose endpoint does not answer (a bucket outage): an upload, a
file read and an input image that names one of our files are answered 503 in the protocol's
shape (the clients retry), never a 500 or a 404 that says the file is gone; nothing of the
upload stays on the API's disk."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.conftest import ApiServer, api_settings, run_api_server
from tests.support import error_body, free_port

NAME = "A" * 32 + ".png"
UNAVAILABLE = {"detail": "Object storage is unavailable; retry shortly"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "k"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AWS_REGION", "us-east-1"),
        ):
            patch.setenv(name, value)
        settings = api_settings(tmp_path_factory.mktemp("api-s3-down"), storage_url="s3://flux-down/p")
        with run_api_server(settings) as server:
            yield server


def test_an_upload_is_answered_503_and_nothing_is_kept(api: ApiServer) -> None:
    answer = api.client.post("/files/upload", content=b"bytes", headers={"content-type": "text/plain"})
    assert answer.status_code == 503 and error_body(answer) == UNAVAILABLE
    started = api.client.post(
        "/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"}
    )
    assert started.status_code == 503 and error_body(started) == UNAVAILABLE
    assert list(api.settings.upload_spool_dir.iterdir()) == []


def test_a_file_read_is_503_not_404(api: ApiServer) -> None:
    answer = api.client.get(f"/files/{NAME}")
    assert answer.status_code == 503 and error_body(answer) == UNAVAILABLE


def test_an_input_image_naming_our_file_is_503(api: ApiServer) -> None:
    body = {"prompt": "p", "image_url": f"{api.base_url}/files/{NAME}", "num_inference_steps": 10}
    answer = api.client.post("/fal-ai/flux/dev/image-to-image", json=body)
    assert answer.status_code == 503 and error_body(answer) == UNAVAILABLE
