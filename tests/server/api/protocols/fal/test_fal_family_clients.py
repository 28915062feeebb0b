"""The real fal clients accept the family's app ids, a fine-tune's own owner included
(`mystyle/flux/dev`, `mystyle/flux-lora`): fal_client (Python) and @fal-ai/client (Node, proxy
and middleware mode) submit, read the status from the URLs they build from the app id, and get
the result, over real HTTP to the API; the test plays the worker. A checkpoint the server does
not serve is a 404 both clients raise at once (neither retries a 404)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import fal_client
import fal_client.client
import pytest

from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server

JS_DIR = Path(__file__).resolve().parents[4] / "e2e" / "js"
IMAGE_URI = "data:image/png;base64," + base64.b64encode(png_bytes(100, 70)).decode()
VARIANTS = {"fill": "tiny", "kontext": "tiny", "mystyle": "tiny"}
APPS = [
    "mystyle/flux/dev",
    "mystyle/flux-lora",
    "mystyle/flux-lora/image-to-image",
    "fal-ai/flux-kontext/dev",
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with run_api_server(api_settings(tmp_path_factory.mktemp("clients"), variants=VARIANTS)) as server:
        yield server


@pytest.fixture
def fal(api: ApiServer, monkeypatch: pytest.MonkeyPatch) -> fal_client.SyncClient:
    """fal_client over plain HTTP: its URL formats are read at call time (see the reference)."""
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{api.base_url}/")
    monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{api.base_url}/run/")
    return fal_client.SyncClient(key="any-key")


@pytest.mark.parametrize("app", APPS)
def test_fal_client_submits_and_follows_the_app_id(
    api: ApiServer, fal: fal_client.SyncClient, app: str
) -> None:
    owner, alias = app.split("/")[:2]
    handle = fal.submit(app, {"prompt": "p", "image_url": IMAGE_URI, "seed": 5})
    assert handle.status_url == f"{api.base_url}/{owner}/{alias}/requests/{handle.request_id}/status"
    assert isinstance(fal.status(app, handle.request_id), fal_client.Queued)  # a URL built from the id
    record = api.claim(handle.request_id)
    assert record.job.variant == ("kontext" if owner == "fal-ai" else "mystyle")
    assert isinstance(handle.status(), fal_client.InProgress)  # the URL the submit returned
    api.complete(record)
    assert isinstance(fal.status(app, handle.request_id), fal_client.Completed)
    assert fal.result(app, handle.request_id)["seed"] == 5 == handle.get()["seed"]


def test_fal_client_raises_the_404_of_an_unserved_checkpoint(
    api: ApiServer, fal: fal_client.SyncClient
) -> None:
    for app, variant in (("fal-ai/flux/krea", "krea"), ("other/flux/dev", "other")):
        with pytest.raises(fal_client.client.FalClientHTTPError) as caught:
            fal.submit(app, {"prompt": "p"})
        assert caught.value.status_code == 404 and caught.value.error_type == "variant_not_configured"
        assert f"--variant {variant}=PATH" in caught.value.message
    assert api.worker.depth() == 0


def test_fal_js_client_submits_and_follows_the_app_id(api: ApiServer) -> None:
    node = shutil.which("node")
    assert node is not None, "node is not installed: run scripts/setup.sh on a machine with Node 18+"
    assert (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir(), "run scripts/setup.sh (npm install)"
    env = {**os.environ, "FLUX_BASE": api.base_url, "FAMILY_APPS": ",".join(APPS), "IMAGE_URI": IMAGE_URI}
    env |= {"UNSERVED_APP": "fal-ai/flux-krea-lora"}
    env.pop("FAL_KEY", None)
    process = subprocess.Popen(
        [node, "family_queue.mjs"],
        cwd=JS_DIR,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for _ in range(2 * len(APPS)):  # proxy mode, then middleware mode
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else "node ended early"
            submitted = json.loads(line)
            record = api.claim(submitted["request_id"], timeout=20)
            owner = submitted["submitted"].split("/")[0]
            assert record.job.variant == ("kontext" if owner == "fal-ai" else "mystyle")
            assert record.job.app_id == "/".join(submitted["submitted"].split("/")[:2])
            api.complete(record)
        output, errors = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, errors
    seen = json.loads(output.strip().splitlines()[-1])
    assert [(run["mode"], run["app"]) for run in seen["runs"]] == [
        (m, a) for m in ("proxy", "middleware") for a in APPS
    ]
    for run in seen["runs"]:
        # The status route of the owner/app the client derived from the id answered.
        assert run["firstStatus"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        assert run["result"]["requestId"] == run["submitted"]["request_id"]
        assert run["result"]["data"]["images"] and run["result"]["data"]["seed"] >= 0
    for mode in ("proxy", "middleware"):
        unserved = seen[f"unserved_{mode}"]
        assert unserved["thrown"] and unserved["isApiError"] and unserved["status"] == 404
        assert unserved["body"]["error_type"] == "variant_not_configured"
        assert "--variant krea=PATH" in unserved["body"]["detail"]
