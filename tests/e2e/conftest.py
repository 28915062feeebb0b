"""End-to-end fixtures: the real fal_client pointed at the shared server, a server with API
keys (auth on), and a real headless Chromium (Debian's `chromium`, driven by Playwright).

fal_client reads FAL_RUN_HOST / FAL_QUEUE_RUN_HOST once, at import time, and builds its
https URL formats from them. The `fal` fixture sets those variables (plus SSL_CERT_FILE and
FAL_KEY) before importing it; if another test module imported fal_client earlier, it sets the
two URL formats to exactly what that import would have produced. test_fal_client.py also
runs the client in a fresh interpreter configured by the environment alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from e2e_support import AUTH_KEY
from playwright.sync_api import Browser, Page, sync_playwright

from server.tls import CertPaths


@dataclass
class FalClients:
    module: ModuleType  # fal_client
    sync: object  # fal_client.SyncClient, created after SSL_CERT_FILE was set
    env: dict[str, str]  # the variables a user would export


def fal_env(port: int, certs: CertPaths, key: str = "anything") -> dict[str, str]:
    hostport = f"127.0.0.1:{port}"
    return {
        "FAL_QUEUE_RUN_HOST": hostport,
        "FAL_RUN_HOST": f"{hostport}/run",
        "SSL_CERT_FILE": str(certs.bundle),
        "FAL_KEY": key,
    }


@pytest.fixture(scope="session")
def fal(flux_server) -> Iterator[FalClients]:
    assert flux_server.certs is not None
    env = fal_env(flux_server.port, flux_server.certs)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        import fal_client
        import fal_client.client

        patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"https://{env['FAL_RUN_HOST']}/")
        patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://{env['FAL_QUEUE_RUN_HOST']}/")
        yield FalClients(module=fal_client, sync=fal_client.SyncClient(), env=env)


@pytest.fixture(scope="session")
def auth_server(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    certs: CertPaths,
    launch_flux_server,
):
    """A second shared server with `--api-key` (auth on)."""
    server = launch_flux_server(
        tmp_path_factory.mktemp("flux-auth-data"),
        tiny_model_dir=tiny_model_dir,
        certs=certs,
        api_keys=[AUTH_KEY],
    )
    yield server
    with contextlib.suppress(AssertionError):
        server.stop()


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module scope, not session: Playwright's sync API keeps an event loop running on the main
    # thread while it is open, and later tests that call asyncio.run() would fail.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, list[str]]]:
    """A fresh page (its own storage) and the URL of every request it makes."""
    context = browser.new_context(ignore_https_errors=True)  # the session's private CA
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.set_default_timeout(60_000)
    yield page, requested
    context.close()
