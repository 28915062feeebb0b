"""Outbound fetches closed by default, through the real API (server/fetch.py): an input image
URL or a webhook URL that leads to loopback, link-local or metadata addresses is a 4xx in the
protocol's own shape naming the reason, before anything is queued; a webhook name that only
DNS can tell is checked at each delivery instead (tests/server/api/webhooks). OpenAI's image
routes take uploads, not URLs: nothing to fetch there."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server

PNG = png_bytes(64, 64)


class ImageHandler(http.server.BaseHTTPRequestHandler):
    requests: int = 0

    def do_GET(self) -> None:
        ImageHandler.requests += 1
        self.send_response(200)
        self.send_header("content-length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def closed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """An API server with the shipped outbound defaults (nothing opened)."""
    with run_api_server(api_settings(tmp_path_factory.mktemp("closed"), outbound_allow=[])) as server:
        yield server


@pytest.fixture
def closed(closed_server: ApiServer) -> Iterator[ApiServer]:
    closed_server.drain()
    yield closed_server
    assert closed_server.worker.depth() == 0  # nothing refused was queued


@pytest.fixture(scope="module")
def opened_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The same, with 127.0.0.1 opened by the operator (`--outbound-allow 127.0.0.1`)."""
    settings = api_settings(tmp_path_factory.mktemp("opened"), outbound_allow=["127.0.0.1"])
    with run_api_server(settings) as server:
        yield server


CLOSED_URLS = [
    ("loopback address", "http://127.0.0.1:{port}/in.png"),
    ("loopback name", "http://localhost:{port}/in.png"),
    ("loopback address", "http://[::1]:{port}/in.png"),
    ("link-local", "http://169.254.3.4/in.png"),
    ("metadata", "http://169.254.169.254/latest/meta-data/"),
    ("metadata", "http://metadata.google.internal/computeMetadata/v1/"),
    ("unspecified", "http://0.0.0.0:{port}/in.png"),
]


@pytest.mark.parametrize(("reason", "template"), CLOSED_URLS)
def test_a_fal_image_url_to_a_closed_address_is_a_422_naming_why(
    closed: ApiServer, image_server: str, reason: str, template: str
) -> None:
    url = template.format(port=image_server.rsplit(":", 1)[1])
    before = ImageHandler.requests
    response = closed.client.post("/fal-ai/flux/dev/image-to-image", json={"prompt": "p", "image_url": url})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image_url"] and error["type"] == "file_download_error"
    assert "refused" in error["msg"] and reason in error["msg"]
    assert ImageHandler.requests == before  # never contacted


@pytest.mark.parametrize(("reason", "template"), CLOSED_URLS)
def test_a_bfl_image_prompt_url_to_a_closed_address_is_a_422_naming_why(
    closed: ApiServer, image_server: str, reason: str, template: str
) -> None:
    url = template.format(port=image_server.rsplit(":", 1)[1])
    response = closed.client.post("/v1/flux-dev", json={"prompt": "p", "image_prompt": url})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image_prompt"] and reason in error["msg"]


def test_an_opened_address_is_fetched(opened_server: ApiServer, image_server: str) -> None:
    opened_server.drain()
    response = opened_server.client.post(
        "/fal-ai/flux/dev/image-to-image", json={"prompt": "p", "image_url": f"{image_server}/in.png"}
    )
    assert response.status_code == 200, response.text
    assert opened_server.claim().job.image is not None
    # Opening 127.0.0.1 opens neither the name localhost nor another loopback address.
    port = image_server.rsplit(":", 1)[1]
    for url in (f"http://localhost:{port}/in.png", f"http://127.0.0.2:{port}/in.png"):
        response = opened_server.client.post(
            "/fal-ai/flux/dev/image-to-image", json={"prompt": "p", "image_url": url}
        )
        assert response.status_code == 422 and "loopback" in response.text


WEBHOOKS = [
    ("loopback address", "http://127.0.0.1:9/hook"),
    ("loopback name", "http://localhost:9/hook"),
    ("metadata", "http://169.254.169.254/hook"),
    ("link-local", "http://[fe80::1]/hook"),
]


@pytest.mark.parametrize(("reason", "url"), WEBHOOKS)
def test_a_fal_webhook_to_a_closed_address_is_refused_at_submit(
    closed: ApiServer, reason: str, url: str
) -> None:
    response = closed.client.post(
        "/fal-ai/flux/dev", params={"fal_webhook": url}, json={"prompt": "p", "image_size": "square"}
    )
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "fal_webhook"] and reason in error["msg"]


@pytest.mark.parametrize(("reason", "url"), WEBHOOKS)
def test_a_bfl_webhook_to_a_closed_address_is_refused_at_submit(
    closed: ApiServer, reason: str, url: str
) -> None:
    response = closed.client.post("/v1/flux-dev", json={"prompt": "p", "webhook_url": url})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "webhook_url"] and reason in error["msg"]


def test_a_webhook_name_is_accepted_at_submit_and_checked_at_delivery(closed: ApiServer) -> None:
    response = closed.client.post(
        "/fal-ai/flux/dev",
        params={"fal_webhook": "https://hooks.example.com/flux"},
        json={"prompt": "p", "image_size": "square"},
    )
    assert response.status_code == 200, response.text
    closed.claim(response.json()["request_id"])
