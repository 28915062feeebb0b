"""fal-ai/flux-lora, /image-to-image and /inpainting over real HTTP: the Job each submit makes,
and the 422s for what the server refuses (the worker side is tested end to end)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
from PIL import Image

from server.jobs import Job, LoraRef
from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server

IMAGE_URI = "data:image/png;base64," + base64.b64encode(png_bytes(100, 70)).decode()
MASK_URI = "data:image/png;base64," + base64.b64encode(png_bytes(100, 70, (255, 255, 255))).decode()
LORA = "/fal-ai/flux-lora"


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    settings = api_settings(tmp_path_factory.mktemp("api"), lora_max_per_request=2)
    with run_api_server(settings) as server:
        yield server


def submitted(api: ApiServer, path: str, body: dict) -> Job:
    """The job as the worker that claims it gets it (input images included)."""
    response = api.client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["status_url"].endswith("/status")
    return api.claim(response.json()["request_id"]).job


def test_text_to_image_with_loras(api: ApiServer) -> None:
    loras = [{"path": "https://lan/style.safetensors", "scale": 0.7, "force": True}, {"path": "studio/ink"}]
    job = submitted(api, LORA, {"prompt": "a cat", "loras": loras, "seed": 5})
    assert job.task == "text-to-image" and job.app_id == "fal-ai/flux-lora" and job.endpoint == ""
    assert job.loras == (LoraRef(path="https://lan/style.safetensors", scale=0.7), LoraRef(path="studio/ink"))
    assert (job.width, job.height, job.num_inference_steps, job.acceleration) == (1024, 768, 28, "none")
    assert submitted(api, LORA, {"prompt": "a cat"}).loras == ()


def test_image_to_image_defaults_to_strength_0_85(api: ApiServer) -> None:
    job = submitted(api, LORA + "/image-to-image", {"prompt": "p", "image_url": IMAGE_URI, "loras": []})
    assert job.task == "image-to-image" and job.strength == 0.85
    assert (job.width, job.height) == (96, 64)  # the input's size, rounded to 16
    assert job.image is not None and job.mask is None


def test_inpainting_takes_image_and_mask(api: ApiServer) -> None:
    body = {"prompt": "p", "image_url": IMAGE_URI, "mask_url": MASK_URI, "strength": 0.6}
    job = submitted(api, LORA + "/inpainting", body)
    assert job.task == "inpainting" and job.strength == 0.6
    assert job.image is not None and job.mask is not None
    # A mask larger than the image is stored at the image's size, as the model resizes it.
    big_mask = "data:image/png;base64," + base64.b64encode(png_bytes(300, 210, (255, 255, 255))).decode()
    job = submitted(api, LORA + "/inpainting", {**body, "mask_url": big_mask})
    mask = Image.open(io.BytesIO(job.mask))
    assert (job.width, job.height) == (96, 64) and mask.size == (96, 64) and mask.mode == "L"
    assert Image.open(io.BytesIO(job.image)).size == (96, 64)


def test_bounds_and_values_are_422(api: ApiServer) -> None:
    three = [{"path": f"l{i}"} for i in range(3)]
    cases = [
        (LORA, {"prompt": "p", "loras": three}, ["body", "loras"], "At most 2 LoRAs per request"),
        (LORA, {"prompt": "p", "acceleration": "high"}, ["body", "acceleration"], "'none' or 'regular'"),
        (
            LORA,
            {"prompt": "p", "loras": [{"path": ""}]},
            ["body", "loras", 0, "path"],
            "at least 1 character",
        ),
        (LORA, {"prompt": "p", "loras": [{"path": "a", "scale": 9}]}, ["body", "loras", 0, "scale"], "4"),
        (
            LORA + "/inpainting",
            {"prompt": "p", "image_url": IMAGE_URI},
            ["body", "mask_url"],
            "Field required",
        ),
        (
            LORA + "/inpainting",
            {"prompt": "p", "image_url": IMAGE_URI, "mask_url": "data:image/png;base64,AAAA"},
            ["body", "mask_url"],
            "could not be decoded",
        ),
    ]
    for path, body, loc, text in cases:
        response = api.client.post(path, json=body)
        assert response.status_code == 422, (body, response.text)
        detail = response.json()["detail"]
        assert any(d["loc"] == loc and text in d["msg"] for d in detail), (body, detail)


def test_unknown_endpoints_and_the_stream_route(api: ApiServer) -> None:
    assert api.client.post("/fal-ai/flux-lora/high-res", json={"prompt": "p"}).status_code == 404
    # `/run/fal-ai/flux-lora/stream`: the bare app id's stream; its first event is the queue.
    with api.client.stream("POST", "/run/fal-ai/flux-lora/stream", json={"prompt": "p"}) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line.startswith("data:"))
    assert '"IN_QUEUE"' in first
