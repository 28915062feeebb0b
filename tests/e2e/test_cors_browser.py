"""CORS with a real browser: `@fal-ai/client` on a page served from another loopback port uses
the proxy route of a server started with `--cors-origin` for that page's origin; the same
page cannot reach a server without it (CORS is off by default)."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import DEV, small_input

from tests.support import free_port

JS_DIR = Path(__file__).resolve().parent / "js"


@pytest.fixture
def other_origin(tmp_path: Path) -> Iterator[str]:
    """A page with @fal-ai/client (bundled for browsers), served on its own loopback port."""
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run(
        [str(JS_DIR / "node_modules/.bin/esbuild"), "browser_entry.mjs", "--bundle", "--format=iife",
         "--platform=browser", f"--outfile={site / 'fal.js'}", "--log-level=warning"],
        cwd=JS_DIR, check=True, timeout=120,
    )  # fmt: skip
    (site / "index.html").write_text(
        '<!doctype html><title>studio tool</title><script src="fal.js"></script>'
    )
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


SUBSCRIBE = """async ([api, endpoint, input]) => {
  fal.config({ proxyUrl: { url: api + "/api/fal/proxy", when: "always" } });
  try {
    const result = await fal.subscribe(endpoint, { input, logs: true });
    return { url: result.data.images[0].url, requestId: result.requestId };
  } catch (error) {
    return { error: String(error) };
  }
}"""


def test_fal_js_client_in_a_page_on_another_origin(
    other_origin, start_flux_server, flux_server, page
) -> None:
    page, requested = page
    page.goto(other_origin + "/index.html")
    page.wait_for_function("typeof window.fal === 'object'")

    allowed = start_flux_server(args=["--cors-origin", other_origin], tls=False)
    result = page.evaluate(SUBSCRIBE, [allowed.base_url, DEV, small_input()])
    assert "error" not in result, result
    assert result["url"].startswith(f"{allowed.base_url}/files/") and result["requestId"]
    # The browser sent preflights for the proxy's custom headers, and they were answered.
    assert any(url.startswith(f"{allowed.base_url}/api/fal/proxy") for url in requested)

    # The shared server was started without --cors-origin: the browser refuses its answers.
    refused = page.evaluate(SUBSCRIBE, [flux_server.base_url, DEV, small_input()])
    assert "error" in refused and "fetch" in refused["error"].lower(), refused
