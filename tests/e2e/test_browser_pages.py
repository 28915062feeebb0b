"""The pages a person opens, in a real headless Chromium (Debian's `chromium`, driven by
Playwright): the playground at `/` generating, cancelling and explaining a 422; `/docs` and
`/redoc` rendering air-gapped. Every request the browser makes must go to this server."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.sync_api import Page

from tests.server.conftest import api_settings, run_api_server

DEV = "fal-ai/flux/dev"


def hosts(urls: list[str]) -> set[str]:
    """Hosts of the network requests (blob: and data: URLs stay inside the page)."""
    return {urlsplit(url).netloc for url in urls if url.startswith(("http://", "https://"))}


def fill_small_request(page: Page, *, size: int = 64, steps: int = 2) -> None:
    page.fill("textarea[name=prompt]", "a watercolor fox in a snowy forest")
    page.select_option("select[name=image_size]", "custom")
    page.fill("input[name='image_size.width']", str(size))
    page.fill("input[name='image_size.height']", str(size))
    page.fill("input[name=num_inference_steps]", str(steps))
    page.fill("input[name=seed]", "7")


def test_playground_generates_cancels_and_explains_errors(flux_server, page, tmp_path: Path) -> None:
    page, requested = page
    page.goto(flux_server.base_url + "/")
    page.wait_for_selector(f"#endpoint option[value='{DEV}']", state="attached")
    page.select_option("#endpoint", DEV)

    # Generate and see the image.
    fill_small_request(page)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#images img')?.naturalWidth === 64")
    assert page.inner_text("#status").startswith("Done")
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").stat().st_size > 0

    # The exact request as code.
    page.click("[data-copy=curl]")
    curl = page.inner_text("#snippet")
    assert f"{flux_server.base_url}/{DEV}" in curl and "watercolor fox" in curl and '"width":64' in curl
    page.click("[data-copy=python]")
    python = page.inner_text("#snippet")
    assert f'fal_client.subscribe(\n    "{DEV}"' in python and '"num_inference_steps": 2' in python
    page.click("[data-copy=javascript]")
    javascript = page.inner_text("#snippet")
    assert f"{flux_server.base_url}/api/fal/proxy" in javascript and "fal.subscribe" in javascript

    # A 422 explained next to its field; nothing queued.
    page.fill("input[name=num_inference_steps]", "51")
    page.click("#generate")
    error = page.locator("[data-field=num_inference_steps] .error")
    error.wait_for()
    page.wait_for_function(
        "document.querySelector('[data-field=num_inference_steps] .error').textContent.length > 0"
    )
    assert "less than or equal to 50" in error.inner_text()

    # Cancel a long request while it runs.
    fill_small_request(page, size=768, steps=50)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Running: step')")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('Failed')")
    assert "request_cancelled" in page.inner_text("#status")

    # The history survives a reload: it lives in this browser.
    page.reload()
    page.wait_for_selector("#history li")
    statuses = page.locator("#history li").all_inner_texts()
    assert len(statuses) == 2 and "request_cancelled" in statuses[0] and "COMPLETED" in statuses[1]

    assert hosts(requested) == {urlsplit(flux_server.base_url).netloc}


def test_playground_image_to_image_with_an_uploaded_file(flux_server, page, tmp_path: Path) -> None:
    page, requested = page
    picture = tmp_path / "input.png"
    Image.new("RGB", (96, 64), (200, 80, 40)).save(picture)
    page.goto(flux_server.base_url + "/")
    page.wait_for_selector(f"#endpoint option[value='{DEV}/image-to-image']", state="attached")
    page.select_option("#endpoint", f"{DEV}/image-to-image")
    page.fill("textarea[name=prompt]", "the same, in watercolor")
    page.set_input_files("input[name='image_url.file']", str(picture))
    page.wait_for_function(
        "document.querySelector('input[name=image_url]').value.startsWith('data:image/png')"
    )
    page.fill("input[name=num_inference_steps]", "10")  # fal's image-to-image minimum
    page.click("#generate")
    # The output follows the input's size.
    page.wait_for_function("document.querySelector('#images img')?.naturalWidth === 96")
    assert page.evaluate("document.querySelector('#images img').naturalHeight") == 64
    assert hosts(requested) == {urlsplit(flux_server.base_url).netloc}


def test_playground_keeps_the_key_in_the_browser(auth_server, page) -> None:
    page, requested = page
    page.goto(auth_server.base_url + "/")
    page.wait_for_selector(f"#endpoint option[value='{DEV}']", state="attached")
    fill_small_request(page)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#form-error').textContent.startsWith('401')")
    page.fill("#api-key", auth_server.api_keys[0])
    page.dispatch_event("#api-key", "change")
    page.reload()
    assert page.input_value("#api-key") == auth_server.api_keys[0]
    page.wait_for_selector(f"#endpoint option[value='{DEV}']", state="attached")
    fill_small_request(page)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#images img')?.naturalWidth === 64")
    assert hosts(requested) == {urlsplit(auth_server.base_url).netloc}


# Swagger UI lays operations out in a virtual list: only those in the viewport are in the DOM,
# and how many depends on whether its CSS applied before the document arrived (an
# `.opblock` count > 10 held only when /openapi.json was slow to come, its first build).
SWAGGER_RENDERED = (
    "document.querySelector('.opblock-summary-path[data-path=\"/fal-ai/flux/dev\"]') !== null"
    " && document.querySelector('.operations-virtual__list') !== null"
)


@pytest.mark.parametrize(
    ("path", "rendered"),
    [
        ("/docs", SWAGGER_RENDERED),
        ("/redoc", "document.body.innerText.includes('/fal-ai/flux/dev')"),
    ],
)
def test_api_docs_render_air_gapped(flux_server, page, path: str, rendered: str) -> None:
    page, requested = page
    with flux_server.client() as http:  # built and cached already, as on a server in use
        assert http.get("/openapi.json").status_code == 200
    page.goto(flux_server.base_url + path)
    # The document lists every endpoint of the family (about 150 paths): laid out in seconds,
    # more than Playwright's default 30 s once on a busy 2-core machine.
    page.wait_for_function(rendered, timeout=120_000)
    assert hosts(requested) == {urlsplit(flux_server.base_url).netloc}


def test_playground_lists_only_the_endpoints_whose_checkpoint_is_served(page, tmp_path: Path) -> None:
    """An API configured with real weights and Kontext only: the Fill and Krea endpoints would
    only answer 404, so the playground leaves them out (/openapi.json still lists them)."""
    page, _ = page
    settings = api_settings(tmp_path, model="/weights/FLUX.1-dev", variants={"kontext": "/weights/kontext"})
    with run_api_server(settings) as api:
        page.goto(api.base_url + "/")
        page.wait_for_selector(f"#endpoint option[value='{DEV}']", state="attached")
        options = set(page.eval_on_selector_all("#endpoint option", "options => options.map(o => o.value)"))
        paths = api.client.get("/openapi.json").json()["paths"]
    assert {DEV, "fal-ai/flux-lora", "fal-ai/flux-kontext/dev", "fal-ai/flux-kontext-lora/inpaint"} <= options
    assert not any("krea" in o or "fill" in o for o in options), options
    assert "/fal-ai/flux-lora-fill" in paths and "/fal-ai/flux/krea" in paths
