"""The outbound-fetch policy (server/fetch.py) against real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from server.config import Settings
from server.fetch import FetchPolicy, FetchRefused, TooLarge, fetch

BODY = b"x" * 1000


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("location", self.path.split("=", 1)[1])
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def files() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def policy(**settings: list[str]) -> FetchPolicy:
    return FetchPolicy.from_settings(Settings(**settings))


def get(url: str, rules: FetchPolicy, max_bytes: int = 10_000, timeout: float = 10.0) -> bytes:
    return asyncio.run(fetch(url, rules, max_bytes=max_bytes, timeout=timeout))


def test_lan_and_loopback_are_allowed_by_default(files: str) -> None:
    assert get(f"{files}/image.png", policy()) == BODY


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "http"),
        ("ftp://files.lan/x.png", "http"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://169.254.10.1/x", "link-local"),
        ("http://[fe80::1]/x", "link-local"),
        ("http://[::ffff:169.254.169.254]/x", "metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("http://0.0.0.0:8000/x", "not a host address"),
    ],
)
def test_refused_schemes_and_addresses(url: str, reason: str) -> None:
    with pytest.raises(FetchRefused, match=reason):
        get(url, policy())


def test_every_redirect_is_checked_again(files: str) -> None:
    # To an allowed place: followed.
    assert get(f"{files}/redirect?to=/image.png", policy()) == BODY
    # To the metadata service: refused before any connection is made there.
    with pytest.raises(FetchRefused, match="metadata"):
        get(f"{files}/redirect?to=http://169.254.169.254/latest/meta-data/", policy())


def test_deny_and_allow_lists(files: str) -> None:
    with pytest.raises(FetchRefused, match="deny list"):
        get(f"{files}/image.png", policy(fetch_deny=["127.0.0.0/8"]))
    with pytest.raises(FetchRefused, match="deny list"):
        get(f"{files.replace('127.0.0.1', 'localhost')}/image.png", policy(fetch_deny=["localhost"]))
    with pytest.raises(FetchRefused, match="allow list"):
        get(f"{files}/image.png", policy(fetch_allow=["10.0.0.0/8", "*.studio.lan"]))
    assert get(f"{files}/image.png", policy(fetch_allow=["127.0.0.1"])) == BODY
    assert (
        get(f"{files.replace('127.0.0.1', 'localhost')}/image.png", policy(fetch_allow=["localhost"])) == BODY
    )


def test_size_cap_and_timeout(files: str) -> None:
    with pytest.raises(TooLarge):
        get(f"{files}/image.png", policy(), max_bytes=len(BODY) - 1)
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with pytest.raises(httpx.TimeoutException):
            get(f"http://127.0.0.1:{silent.getsockname()[1]}/x", policy(), timeout=0.5)


def test_fal_image_urls_go_through_the_policy(api) -> None:
    response = api.client.post(
        "/fal-ai/flux/dev/image-to-image", json={"prompt": "p", "image_url": "http://169.254.169.254/x.png"}
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image_url"] and error["type"] == "file_download_error"
    assert "link-local" in error["msg"] or "metadata" in error["msg"]
    assert api.worker.depth() == 0
