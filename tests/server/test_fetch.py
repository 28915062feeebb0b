"""The outbound-fetch policy (server/fetch.py) against real HTTP servers on loopback: closed
by default for loopback, link-local, metadata and unspecified addresses, opened by
`outbound_allow`; connections to the checked address; one deadline for the whole fetch."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import httpx
import pytest

from server import fetch as fetch_module
from server.config import Settings
from server.fetch import DeadlineExceeded, FetchPolicy, FetchRefused, TooLarge, fetch
from tests.support import LOOPBACK_OUTBOUND

BODY = b"x" * 1000


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hosts: ClassVar[list[str]] = []  # the Host header of every request

    def do_GET(self) -> None:
        Handler.hosts.append(self.headers.get("Host", ""))
        if self.path == "/trickle":  # one byte every 0.2 s: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("content-length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
            return
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
    """The policy of these settings, loopback opened (the test servers are there)."""
    return FetchPolicy.from_settings(Settings(**{"outbound_allow": LOOPBACK_OUTBOUND, **settings}))


def default_policy(**settings: list[str]) -> FetchPolicy:
    """The policy as shipped: nothing opened."""
    return FetchPolicy.from_settings(Settings(**{"outbound_allow": [], **settings}))


def get(url: str, rules: FetchPolicy, max_bytes: int = 10_000, timeout: float = 10.0) -> bytes:
    return asyncio.run(fetch(url, rules, max_bytes=max_bytes, timeout=timeout))


def test_loopback_is_closed_by_default_and_opened_by_outbound_allow(files: str) -> None:
    port = files.rsplit(":", 1)[1]
    for url in (files, f"http://localhost:{port}", f"http://[::ffff:127.0.0.1]:{port}"):
        with pytest.raises(FetchRefused, match="loopback"):
            get(f"{url}/image.png", default_policy())
    assert Settings().outbound_allow == []  # the shipped default
    assert get(f"{files}/image.png", default_policy(outbound_allow=["127.0.0.1"])) == BODY
    assert get(f"{files}/image.png", default_policy(outbound_allow=["127.0.0.0/8"])) == BODY
    with pytest.raises(FetchRefused, match="loopback"):  # opening one address opens no other
        get(f"{files}/image.png", default_policy(outbound_allow=["127.0.0.2"]))


def test_private_ranges_stay_open_by_default() -> None:
    """Studios fetch from their own network: RFC 1918 and unique-local addresses pass the
    check (the connection itself is not made here: nothing listens there)."""
    rules = default_policy()
    private = ("http://10.1.2.3/x", "http://192.168.0.10/x", "http://172.16.5.5/x", "http://[fd12::1]/x")
    for url in (*private, "http://[::ffff:10.1.2.3]/x", "http://8.8.8.8/x"):
        assert rules.check_static(url)[0] == url.split("//")[1].split("/")[0].strip("[]")
    with pytest.raises(FetchRefused, match="deny list"):
        default_policy(fetch_deny=["10.0.0.0/8"]).check_static("http://10.1.2.3/x")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/x", "loopback"),
        ("http://127.8.9.10/x", "loopback"),
        ("http://[::1]/x", "loopback"),
        ("http://localhost/x", "loopback name"),
        ("http://api.localhost/x", "loopback name"),
        ("http://[64:ff9b::7f00:1]/x", "loopback"),  # NAT64 of 127.0.0.1
        ("http://[2002:7f00:1::]/x", "loopback"),  # 6to4 of 127.0.0.1
        ("http://0.0.0.0:8000/x", "unspecified"),
        ("http://[::]/x", "unspecified"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
        ("http://100.100.100.200/x", "metadata"),
        ("http://224.0.0.1/x", "not a host address"),
    ],
)
def test_closed_addresses_by_default(url: str, reason: str) -> None:
    with pytest.raises(FetchRefused, match=reason):
        get(url, default_policy())


def test_metadata_opens_only_when_listed_exactly() -> None:
    wide = default_policy(outbound_allow=["169.254.0.0/16"])
    assert wide.check_static("http://169.254.10.1/x")  # link-local opened by the network
    with pytest.raises(FetchRefused, match="metadata"):
        wide.check_static("http://169.254.169.254/x")
    assert default_policy(outbound_allow=["169.254.169.254"]).check_static("http://169.254.169.254/x")


def test_the_connection_goes_to_the_checked_address(files: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No second lookup (DNS rebinding): the name is resolved once by the policy and the
    connection goes to that address, with the URL's Host header. `rebind.test` exists in no
    DNS: only the policy's answer can have led the request to the test server."""
    port = int(files.rsplit(":", 1)[1])
    lookups: list[str] = []

    async def resolve(host: str, _port: int) -> list:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(fetch_module, "resolve", resolve)
    Handler.hosts.clear()
    assert get(f"http://rebind.test:{port}/image.png", default_policy(outbound_allow=["127.0.0.1"])) == BODY
    assert lookups == ["rebind.test"] and Handler.hosts == [f"rebind.test:{port}"]

    # The same name answering with a closed address is refused before any connection.
    async def to_metadata(host: str, _port: int) -> list:
        return [ipaddress.ip_address("169.254.169.254")]

    monkeypatch.setattr(fetch_module, "resolve", to_metadata)
    Handler.hosts.clear()
    with pytest.raises(FetchRefused, match=r"rebind\.test resolves to 169\.254\.169\.254, a cloud metadata"):
        get(f"http://rebind.test:{port}/image.png", policy())
    assert Handler.hosts == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [  # refused even with loopback opened
        ("file:///etc/passwd", "http"),
        ("ftp://files.lan/x.png", "http"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://169.254.10.1/x", "link-local"),
        ("http://[fe80::1]/x", "link-local"),
        ("http://[::ffff:169.254.169.254]/x", "metadata"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata"),
        ("http://0.0.0.0:8000/x", "unspecified"),
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


def test_the_timeout_is_a_deadline_for_the_whole_fetch(files: str) -> None:
    """A server trickling a byte every 0.2 s never trips a per-read timeout of 1 s; the
    deadline ends the fetch after 1 s all the same."""
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        get(f"{files}/trickle", policy(), timeout=1.0)
    assert time.monotonic() - started < 3.0


def test_fal_image_urls_go_through_the_policy(api) -> None:
    response = api.client.post(
        "/fal-ai/flux/dev/image-to-image", json={"prompt": "p", "image_url": "http://169.254.169.254/x.png"}
    )
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image_url"] and error["type"] == "file_download_error"
    assert "link-local" in error["msg"] or "metadata" in error["msg"]
    assert api.worker.depth() == 0
