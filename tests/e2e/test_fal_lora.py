"""fal-ai/flux-lora end to end: the real fal_client against `flux-server serve` with two
workers, a LoRA folder, a local Hugging Face cache and a LAN file server on loopback.

Images are requested as PNG, so "the same image" is a byte comparison of what the server
returns. Both workers load the same tiny model on the same CPU and compute identical bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2e_support import cancel, status, submit, wait_completed, wait_running
from lora_support import (
    LanFileServer,
    add_to_hf_cache,
    tiny_transformer,
    write_bad_loras,
    write_good_loras,
)

from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)

APP = "fal-ai/flux-lora"


@dataclass
class LoraSetup:
    server: object  # tests/conftest.FluxServer
    lan: LanFileServer
    fal: object  # fal_client.SyncClient pointed at this server
    fal_module: object
    upload_url: str

    def client(self) -> httpx.Client:
        return self.server.client()  # type: ignore[attr-defined]

    def png(self, endpoint: str = APP, **arguments: object) -> tuple[bytes, dict]:
        body = {
            "prompt": "a lighthouse",
            "image_size": {"width": 64, "height": 64},
            "num_inference_steps": 2,
            "seed": 9,
            "output_format": "png",
            **arguments,
        }
        output = self.fal.run(endpoint, body)  # type: ignore[attr-defined]
        with self.client() as client:
            response = client.get(output["images"][0]["url"])
        assert response.status_code == 200
        return response.content, output


@pytest.fixture(scope="module")
def lora(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, certs, launch_flux_server
) -> Iterator[LoraSetup]:
    root = tmp_path_factory.mktemp("lora-e2e")
    transformer = tiny_transformer(tiny_model_dir)
    good = write_good_loras(root / "made", transformer)
    bad = write_bad_loras(root / "bad")
    library = root / "library"
    (library / "team").mkdir(parents=True)
    shutil.copy(good["style"], library / "style.safetensors")
    shutil.copy(good["kohya"], library / "team" / "kohya.safetensors")
    for name in ("wide", "big"):
        shutil.copy(bad[name], library / f"{name}.safetensors")
    shutil.copy(good["rank32"], library / "rank32.safetensors")
    add_to_hf_cache(root / "hf", "studio/ink", "ink.safetensors", good["ink"].read_bytes())
    lan = LanFileServer(
        {"lan.safetensors": good["lan"].read_bytes(), "junk.safetensors": bad["junk"].read_bytes()}
    )
    data_dir = root / "data"

    args = ["--lora-dir", str(library), "--lora-max-bytes", "200000", "--lora-max-rank", "16"]
    saved = os.environ.get("HF_HUB_CACHE")
    os.environ["HF_HUB_CACHE"] = str(root / "hf")  # inherited by the server's processes
    try:
        server = launch_flux_server(
            data_dir, tiny_model_dir=tiny_model_dir, certs=certs, args=args, workers=2
        )
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_CACHE", None)
        else:
            os.environ["HF_HUB_CACHE"] = saved
    hostport = f"127.0.0.1:{server.port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(certs.bundle))
        patch.setenv("FAL_KEY", "anything")
        import fal_client
        import fal_client.client

        patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"https://{hostport}/run/")
        patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://{hostport}/")
        # The documented upload-host line (docs/api/fal.md), then a fresh client.
        patch.setattr(fal_client.client, "REST_URL", server.base_url)
        patch.setattr(fal_client.client, "CDN_URL", server.base_url)
        client = fal_client.SyncClient()
        try:
            upload_url = client.upload_file(good["upload"])  # fal's storage protocol, to this server
            yield LoraSetup(server=server, lan=lan, fal=client, fal_module=fal_client, upload_url=upload_url)
        finally:
            lan.close()
            with contextlib.suppress(AssertionError):
                server.stop()


def test_every_source_applies_and_plain_requests_stay_identical(lora: LoraSetup) -> None:
    base, plain_output = lora.png()
    assert lora.upload_url.startswith(lora.server.base_url + "/files/")  # type: ignore[attr-defined]
    sources = {
        "LAN URL": f"{lora.lan.url}/lan.safetensors",
        "--lora-dir name": "style",
        "--lora-dir path (kohya)": "team/kohya.safetensors",
        "HF cache repo id (XLabs)": "studio/ink",
        "upload": lora.upload_url,
    }
    images = {}
    for what, path in sources.items():
        image, output = lora.png(loras=[{"path": path, "scale": 1.0}])
        assert output["seed"] == 9 and output["prompt"] == "a lighthouse", what
        images[what] = image
    assert len({base, *images.values()}) == len(sources) + 1, "every LoRA changes the image"
    again, _ = lora.png()
    assert again == base  # no LoRA leaked into the plain request (on either worker)
    assert lora.png(loras=[{"path": "style"}])[0] == images["--lora-dir name"]
    assert lora.lan.requests == ["/lan.safetensors"]  # downloaded once
    assert plain_output["acceleration"] == "none"


def test_scales(lora: LoraSetup) -> None:
    base, _ = lora.png()
    assert lora.png(loras=[{"path": "style", "scale": 0.0}])[0] == base
    style = lora.png(loras=[{"path": "style"}])[0]
    kohya = lora.png(loras=[{"path": "team/kohya.safetensors"}])[0]
    both = lora.png(
        loras=[{"path": "style", "scale": 0.5}, {"path": "team/kohya.safetensors", "scale": 0.5}]
    )[0]
    assert len({base, style, kohya, both}) == 4


def test_the_job_log_names_the_loras(lora: LoraSetup) -> None:
    with lora.client() as client:
        body = {"prompt": "p", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
        request_id = submit(client, APP, {**body, "loras": [{"path": "style"}]})["request_id"]
        done = wait_completed(client, request_id, app=APP)
    messages = [entry["message"] for entry in done["logs"]]
    assert any(m.startswith("LoRA style: ") for m in messages), messages
    assert any(m.startswith("LoRA cache: ") for m in messages), messages


def test_image_to_image_and_inpainting(lora: LoraSetup) -> None:
    source, _ = lora.png()
    from base64 import b64encode

    image_uri = "data:image/png;base64," + b64encode(source).decode()
    plain_i2i, out = lora.png(f"{APP}/image-to-image", image_url=image_uri)
    styled_i2i, _ = lora.png(f"{APP}/image-to-image", image_url=image_uri, loras=[{"path": "style"}])
    assert plain_i2i != styled_i2i and out["images"][0]["width"] == 64

    import io

    from PIL import Image

    mask = Image.new("L", (64, 64))
    mask.paste(255, (32, 0, 64, 64))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    mask_uri = "data:image/png;base64," + b64encode(buffer.getvalue()).decode()
    fields = {"image_url": image_uri, "mask_url": mask_uri}
    plain_inpaint, _ = lora.png(f"{APP}/inpainting", **fields)
    styled_inpaint, _ = lora.png(f"{APP}/inpainting", **fields, loras=[{"path": "style"}])
    assert plain_inpaint != styled_inpaint


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("{lan}/missing.safetensors", "download failed: HTTP 404"),
        ("http://127.0.0.1:1/gone.safetensors", "download failed: ConnectError"),
        ("{lan}/junk.safetensors", "is not a safetensors file"),
        ("wide", "does not fit this model"),
        ("big", "above this server's limit of 0.2 MB per LoRA"),
        ("rank32", "has rank 32, above this server's limit of 16"),
        ("../outside", "leads outside the LoRA folder"),
        ("studio/nothing", "studio/nothing is not in the local Hugging Face cache"),
    ],
)
def test_a_bad_lora_fails_its_request_and_the_worker_goes_on(
    lora: LoraSetup, path: str, problem: str
) -> None:
    path = path.format(lan=lora.lan.url)
    errors = lora.fal_module.FalClientHTTPError  # type: ignore[attr-defined]
    with pytest.raises(errors) as caught:
        lora.png(loras=[{"path": "style"}, {"path": path}])
    assert caught.value.status_code == 422
    [detail] = caught.value.message
    assert detail["loc"] == ["body", "loras", 1, "path"]
    assert detail["msg"].startswith(f"LoRA '{path}': ") and problem in detail["msg"], detail
    assert detail["type"] == "lora_load_error"
    image, _ = lora.png(loras=[{"path": "style"}])  # the next request is served normally
    assert image


def test_a_lora_job_on_one_worker_while_the_other_serves_plain_requests(lora: LoraSetup) -> None:
    long_lora = {
        "prompt": "slow",
        "image_size": {"width": 512, "height": 512},
        "num_inference_steps": 50,
        "loras": [{"path": "style"}],
    }
    with lora.client() as client:
        slow = submit(client, APP, long_lora)["request_id"]
        running = wait_running(client, slow, app=APP)
        slow_worker = next(e["message"] for e in running["logs"] if e["message"].startswith("Started on"))
        try:
            for seed in (1, 2):
                quick = submit(
                    client,
                    APP,
                    {
                        "prompt": "quick",
                        "seed": seed,
                        "num_inference_steps": 2,
                        "image_size": {"width": 64, "height": 64},
                    },
                )["request_id"]
                done = wait_completed(client, quick, app=APP)
                assert "error" not in done
                started = next(e["message"] for e in done["logs"] if e["message"].startswith("Started on"))
                assert started != slow_worker
            assert status(client, slow, app=APP)["status"] == "IN_PROGRESS"
        finally:
            cancel(client, slow, app=APP)
            wait_completed(client, slow, app=APP)


def test_too_many_loras_is_a_422_at_submit(lora: LoraSetup) -> None:
    errors = lora.fal_module.FalClientHTTPError  # type: ignore[attr-defined]
    with pytest.raises(errors) as caught:
        lora.fal.submit(APP, {"prompt": "p", "loras": [{"path": "style"}] * 4})  # type: ignore[attr-defined]
    assert caught.value.status_code == 422
    assert caught.value.message[0]["loc"] == ["body", "loras"]


def test_queue_subscribe_with_logs(lora: LoraSetup) -> None:
    updates: list[object] = []
    body = {"prompt": "p", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
    output = lora.fal.subscribe(  # type: ignore[attr-defined]
        APP, {**body, "loras": [{"path": "style"}]}, with_logs=True, on_queue_update=updates.append
    )
    assert output["images"][0]["width"] == 64
    done = updates[-1]
    assert type(done).__name__ == "Completed"
    assert any(log["message"].startswith("LoRA cache: ") for log in done.logs)  # type: ignore[attr-defined]


def test_webhooks_carry_the_output_and_the_lora_error(lora: LoraSetup) -> None:
    from urllib.parse import quote

    body = {"prompt": "p", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
    with lora.client() as client:
        for name, path in (("good", "style"), ("bad", "rank32")):
            hook = quote(f"{lora.lan.url}/hook/{name}", safe="")
            response = client.post(f"/{APP}?fal_webhook={hook}", json={**body, "loras": [{"path": path}]})
            assert response.status_code == 200, response.text
            wait_completed(client, response.json()["request_id"], app=APP)

    def delivered() -> dict[str, dict]:
        return {path.rsplit("/", 1)[-1]: payload for path, payload in lora.lan.posted}

    wait_until(lambda: len(delivered()) == 2, timeout=30, what="both webhooks")
    hooks = delivered()
    assert hooks["good"]["status"] == "OK" and hooks["good"]["payload"]["images"]
    assert hooks["bad"]["status"] == "ERROR" and hooks["bad"]["error"] == "Invalid status code: 422"
    [detail] = hooks["bad"]["payload"]["detail"]
    assert detail["loc"] == ["body", "loras", 0, "path"] and "has rank 32" in detail["msg"]


def test_the_js_client_in_proxy_mode(lora: LoraSetup) -> None:
    import json
    import subprocess

    node = shutil.which("node")
    js_dir = Path(__file__).parent / "js"
    assert node is not None and (js_dir / "node_modules" / "@fal-ai" / "client").is_dir(), (
        "run scripts/setup.sh"
    )
    env = {
        **os.environ,
        "FLUX_BASE": lora.server.base_url,  # type: ignore[attr-defined]
        "NODE_EXTRA_CA_CERTS": str(lora.server.certs.ca),  # type: ignore[attr-defined]
        "LORA_PATH": f"{lora.lan.url}/lan.safetensors",
        "BAD_LORA_PATH": "wide",
    }
    proc = subprocess.run(
        [node, "lora.mjs"], cwd=js_dir, env=env, capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["data"]["seed"] == 9 and out["data"]["images"][0]["content_type"] == "image/png"
    with lora.client() as client:
        image = client.get(out["data"]["images"][0]["url"]).content
    assert image == lora.png(loras=[{"path": f"{lora.lan.url}/lan.safetensors"}])[0]
    assert out["bad"]["thrown"] and out["bad"]["isApiError"] and out["bad"]["status"] == 422
    assert "does not fit this model" in out["bad"]["body"]["detail"][0]["msg"]


def test_lora_cache_hits_and_misses_are_in_the_metrics(lora: LoraSetup) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, str], float]:
        with lora.client() as client:
            text = client.get("/metrics").text
        return {
            (sample.name, sample.labels.get("result", "")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name.startswith("fluxserver_lora_")
        }

    before = scrape()
    lora.png(loras=[{"path": "style"}])  # held by now on both workers or read once more
    lora.png(loras=[{"path": f"{lora.lan.url}/lan.safetensors"}])  # downloaded long ago: a hit
    after = scrape()

    def grew(name: str, result: str) -> float:
        return after.get((name, result), 0.0) - before.get((name, result), 0.0)

    loads = grew("fluxserver_lora_loads_total", "hit") + grew("fluxserver_lora_loads_total", "miss")
    assert loads == 2
    assert grew("fluxserver_lora_downloads_total", "hit") == 1
    assert grew("fluxserver_lora_downloads_total", "miss") == 0
