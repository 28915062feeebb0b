"""Helpers shared by the end-to-end tests: raw fal queue calls, a long "blocker" job, images.

The tiny model runs a 64x64, 2-step job in a fraction of a second on a CPU, so tests that
need a busy worker (queue positions, cancelling a queued job, start timeouts) first submit a
blocker: a large, many-step job that keeps the worker busy until it is cancelled.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

from tests.support import wait_until

APP = "fal-ai/flux"  # status, result and cancel URLs use owner/app only
DEV = "fal-ai/flux/dev"
PROMPT = "a watercolor fox in a snowy forest"
AUTH_KEY = "e2e-secret-key"  # the key of the shared auth-on server (tests/e2e/conftest.py)


def small_input(**overrides: object) -> dict:
    """A text-to-image input that finishes in well under a second on the tiny model."""
    return {
        "prompt": PROMPT,
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 2,
        "seed": 7,
        **overrides,
    }


# About one second per step at this size on two shared CPU cores: long enough to stay busy
# for the whole test, and a cancel stops it at the next step.
BLOCKER_INPUT = {
    "prompt": "blocker",
    "image_size": {"width": 768, "height": 768},
    "num_inference_steps": 50,
    "seed": 1,
}


def submit(client: httpx.Client, endpoint: str, body: dict, headers: dict | None = None) -> dict:
    response = client.post(f"/{endpoint}", json=body, headers=headers or {})
    assert response.status_code == 200, response.text
    return response.json()


def status(client: httpx.Client, request_id: str, app: str = APP, logs: bool = True) -> dict:
    response = client.get(f"/{app}/requests/{request_id}/status", params={"logs": int(logs)})
    assert response.status_code in (200, 202), response.text
    return response.json()


def wait_for(
    client: httpx.Client,
    request_id: str,
    condition: Callable[[dict], bool],
    *,
    app: str = APP,
    timeout: float = 90.0,
    what: str = "condition",
) -> dict:
    last: dict = {}

    def reached() -> dict | None:
        last.update(body := status(client, request_id, app))
        return body if condition(body) else None

    try:
        return wait_until(reached, timeout, what, interval=0.1)
    except AssertionError:
        raise AssertionError(
            f"request {request_id}: {what} not reached in {timeout:.0f} s; last {last}"
        ) from None


def wait_completed(client: httpx.Client, request_id: str, *, app: str = APP, timeout: float = 90.0) -> dict:
    return wait_for(
        client, request_id, lambda b: b["status"] == "COMPLETED", app=app, timeout=timeout, what="COMPLETED"
    )


def wait_running(client: httpx.Client, request_id: str, *, app: str = APP, timeout: float = 60.0) -> dict:
    """Until the job is IN_PROGRESS and has done at least one denoising step."""
    return wait_for(
        client,
        request_id,
        lambda b: b["status"] == "IN_PROGRESS" and any("step" in e["message"] for e in b["logs"]),
        app=app,
        timeout=timeout,
        what="IN_PROGRESS with a step done",
    )


def cancel(client: httpx.Client, request_id: str, app: str = APP) -> httpx.Response:
    return client.put(f"/{app}/requests/{request_id}/cancel")


@contextmanager
def blocking_job(client: httpx.Client) -> Iterator[str]:
    """Keep the (single) worker busy: yields the blocker's id once it runs; cancels it after."""
    request_id = submit(client, DEV, BLOCKER_INPUT)["request_id"]
    try:
        wait_running(client, request_id)
        yield request_id
    finally:
        cancel(client, request_id)
        wait_completed(client, request_id, timeout=60)


def fetch_image(client: httpx.Client, url: str) -> tuple[Image.Image, httpx.Response]:
    """GET an image URL the server returned (absolute) and decode it."""
    response = client.get(url)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:200]}"
    data = response.content
    assert data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    image = Image.open(io.BytesIO(data))
    image.load()
    return image, response


def check_output(client: httpx.Client, output: dict, *, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """fal's FLUX output shape (docs/api/fal.md) with a fetchable image of the expected size."""
    assert set(output) >= {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}, output
    assert len(output["images"]) == len(output["has_nsfw_concepts"]) >= 1
    meta = output["images"][0]
    assert (meta["width"], meta["height"]) == size
    image, response = fetch_image(client, meta["url"])
    assert image.size == size
    assert response.headers["content-type"] == meta["content_type"]
    assert {"image/jpeg": "JPEG", "image/png": "PNG"}[meta["content_type"]] == image.format
    return image


def sample_image_data_uri(size: tuple[int, int] = (64, 64)) -> str:
    """A small input picture as the data URI fal_client.encode_image makes."""
    import fal_client

    image = Image.new("RGB", size, (200, 80, 40))
    for x in range(size[0] // 2):
        for y in range(size[1]):
            image.putpixel((x, y), (30, 120, 220))
    return fal_client.encode_image(image, format="png")


JS_DIR = Path(__file__).parent / "js"


def run_node_script(server, script: str, **env: str) -> dict:
    """Run tests/e2e/js/<script> against `server` with the real @fal-ai/client; returns the
    JSON object it prints last. `env` adds variables (FAL_MODE, ...)."""
    node = shutil.which("node")
    assert node is not None, "node is not installed: run scripts/setup.sh on a machine with Node 18+"
    assert (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir(), (
        f"@fal-ai/client is not installed in {JS_DIR}: run scripts/setup.sh (it runs `npm install` there)"
    )
    full_env = {
        **os.environ,
        "FLUX_BASE": server.base_url,
        "NODE_EXTRA_CA_CERTS": str(server.certs.ca),
        **env,
    }
    full_env.pop("FAL_KEY", None)
    proc = subprocess.run(
        [node, script], cwd=JS_DIR, env=full_env, capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, f"{proc.stderr}\n--- server log ---\n{server.log()[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
