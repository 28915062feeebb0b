"""Outbound fetches closed by default (issue 18), through the real clients against a server
started with the shipped defaults (no `--outbound-allow`): an input image URL, a webhook and a
LoRA URL naming loopback, link-local or metadata addresses are each refused with fal's 422
(which neither fal client retries), and the closed address is never contacted. BFL's route
with curl; OpenAI's image routes take uploads, not URLs, so they fetch nothing."""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import DEV, run_node_script, small_input

from tests.conftest import FluxServer


class Listener(http.server.BaseHTTPRequestHandler):
    """Stands at the closed address: counts any request that reaches it."""

    hits = 0

    def do_GET(self) -> None:
        Listener.hits += 1
        self.send_response(404)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def closed_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def closed_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir, certs, launch_flux_server
) -> Iterator[FluxServer]:
    server = launch_flux_server(
        tmp_path_factory.mktemp("closed"), tiny_model_dir=tiny_model_dir, certs=certs, outbound_allow=()
    )
    yield server
    server.stop()


@pytest.fixture
def fal(closed_server: FluxServer) -> Iterator[Any]:
    """The real fal_client, its queue and run hosts pointed at the closed server."""
    assert closed_server.certs is not None
    base = closed_server.base_url
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(closed_server.certs.bundle))
        import fal_client
        import fal_client.client

        patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{base}/")
        patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{base}/run/")
        yield fal_client


def refusal(exc: Exception) -> dict:
    assert exc.status_code == 422, exc  # type: ignore[attr-defined]
    (detail,) = json.loads(exc.response.text)["detail"]  # type: ignore[attr-defined]
    return detail


def test_fal_client_image_webhook_and_lora_urls_to_closed_addresses(
    fal: Any, closed_url: str, closed_server: FluxServer
) -> None:
    client = fal.SyncClient(key="anything")
    before = Listener.hits
    for url, reason in (
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        (f"{closed_url}/in.png", "loopback"),
        ("http://[fe80::1]/in.png", "link-local"),
    ):
        with pytest.raises(fal.FalClientHTTPError) as raised:
            client.submit(f"{DEV}/image-to-image", {**small_input(num_inference_steps=10), "image_url": url})
        detail = refusal(raised.value)
        assert detail["loc"] == ["body", "image_url"] and reason in detail["msg"], detail
    with pytest.raises(fal.FalClientHTTPError) as raised:
        client.submit(DEV, small_input(), webhook_url=f"{closed_url}/hook")
    assert "loopback" in refusal(raised.value)["msg"]
    # A LoRA URL is fetched by the worker: the request is accepted, then fails naming why.
    with pytest.raises(fal.FalClientHTTPError) as raised:
        client.subscribe(
            "fal-ai/flux-lora", {**small_input(), "loras": [{"path": f"{closed_url}/s.safetensors"}]}
        )
    detail = refusal(raised.value)
    assert detail["loc"] == ["body", "loras", 0, "path"] and "loopback" in detail["msg"], detail
    assert Listener.hits == before  # never contacted


def test_js_client_image_webhook_and_lora_urls_to_closed_addresses(
    closed_server: FluxServer, closed_url: str
) -> None:
    before = Listener.hits
    out = run_node_script(closed_server, "outbound.mjs", CLOSED_URL=closed_url)
    for name, where, reason in (
        ("image", ["body", "image_url"], "metadata"),
        ("webhook", ["query", "fal_webhook"], "loopback"),
        ("lora", ["body", "loras", 0, "path"], "loopback"),
    ):
        attempt = out[name]
        assert attempt["thrown"] and attempt["isApiError"] and attempt["status"] == 422, (name, attempt)
        (detail,) = attempt["body"]["detail"]
        assert detail["loc"] == where and reason in detail["msg"], (name, detail)
    assert Listener.hits == before


def test_bfl_with_curl(closed_server: FluxServer, closed_url: str) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is not installed"
    assert closed_server.certs is not None
    before = Listener.hits
    for field, url, reason in (
        ("image_prompt", "http://169.254.169.254/latest/meta-data/", "metadata"),
        ("webhook_url", f"{closed_url}/hook", "loopback"),
    ):
        body = json.dumps({"prompt": "a fox", "width": 256, "height": 256, field: url})
        answer = subprocess.run(
            [curl, "-sS", "--cacert", str(closed_server.certs.ca), "-w", "\n%{http_code}",
             "-H", "content-type: application/json", "-d", body, f"{closed_server.base_url}/v1/flux-dev"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        text, code = answer.stdout.rsplit("\n", 1)
        assert code == "422", text
        (detail,) = json.loads(text)["detail"]
        assert detail["loc"] == ["body", field] and reason in detail["msg"], detail
    assert Listener.hits == before
