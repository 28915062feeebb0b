"""OpenAI's images API choosing a checkpoint by `model`, with the real `openai` SDK over real
HTTP (the test plays the worker): a Kontext edit, Krea and a fine-tune on generations, the
served models in /v1/models, and a 404 `model_not_found` the SDK does not retry for a family
member the server does not serve."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import httpx
import openai
import pytest
from PIL import Image

from server.jobs import Job
from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server

T = TypeVar("T")
VARIANTS = {"kontext": "tiny", "krea": "tiny", "mystyle": "tiny"}


@pytest.fixture(scope="module")
def family_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with run_api_server(api_settings(tmp_path_factory.mktemp("family"), variants=VARIANTS)) as server:
        yield server


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    settings = api_settings(tmp_path_factory.mktemp("bare"), model="/weights/FLUX.1-dev")
    with run_api_server(settings) as server:
        yield server


def sdk(server: ApiServer, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1",
        api_key="unused",
        http_client=httpx.Client(timeout=30.0),
        max_retries=max_retries,
    )


def run_as_worker(server: ApiServer, call: Callable[[], T]) -> tuple[T, Job]:
    """Make the SDK call while this test completes the job it submits; (answer, claimed job)."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call)
        record = server.claim(timeout=20)
        server.complete(record)
        return answer.result(timeout=30), record.job


def test_an_edit_naming_kontext_is_a_kontext_edit(family_server: ApiServer) -> None:
    picture = ("in.png", png_bytes(1000, 750), "image/png")
    with sdk(family_server) as client:
        for model in ("flux.1-kontext-dev", "black-forest-labs/FLUX.1-Kontext-dev", "flux-kontext-dev"):
            answer, job = run_as_worker(
                family_server,
                lambda m=model: client.images.edit(model=m, image=picture, prompt="make it winter"),
            )
            assert (job.task, job.variant, job.resolution_mode) == ("edit", "kontext", "auto"), model
            # "auto" is Kontext's preferred resolution nearest 4:3; the input is kept as sent.
            assert (job.width, job.height, job.guidance_scale, job.num_inference_steps) == (
                1184,
                880,
                2.5,
                28,
            )
            assert Image.open(io.BytesIO(job.image)).size == (1000, 750) and len(answer.data) == 1
        _, job = run_as_worker(
            family_server,
            lambda: client.images.edit(
                model="flux.1-kontext-dev",
                image=picture,
                prompt="p",
                size="512x512",
                extra_body={"guidance": 4},
            ),
        )
        assert (job.task, job.width, job.height, job.guidance_scale) == ("edit", 512, 512, 4)
        # Any other model name edits by image-to-image on the base model, as before.
        _, job = run_as_worker(
            family_server, lambda: client.images.edit(model="gpt-image-1", image=picture, prompt="p")
        )
        assert (job.task, job.variant, job.strength) == ("image-to-image", "dev", 0.85)


def test_generations_choose_krea_a_fine_tune_or_the_base(family_server: ApiServer) -> None:
    with sdk(family_server) as client:
        cases = {
            "flux.1-krea-dev": ("krea", 4.5),
            "FLUX.1-Krea-dev": ("krea", 4.5),
            "mystyle": ("mystyle", 3.5),
            "flux.1-dev": ("dev", 3.5),
            "dall-e-3": ("dev", 3.5),
            "flux.1-kontext-dev": ("kontext", 2.5),  # Kontext can generate from the prompt alone
        }
        for model, (variant, guidance) in cases.items():
            _, job = run_as_worker(
                family_server, lambda m=model: client.images.generate(model=m, prompt="p", size="256x256")
            )
            assert (job.task, job.variant, job.guidance_scale) == ("text-to-image", variant, guidance), model
            assert (job.width, job.height, job.app_id, job.endpoint) == (
                256,
                256,
                "openai/images",
                "images/generations",
            )
        ids = [model.id for model in client.models.list().data]
        assert ids == ["flux.1-dev", "tiny", "flux.1-kontext-dev", "flux.1-krea-dev", "mystyle"]
        assert client.models.retrieve("mystyle").id == "mystyle"


def test_a_family_member_not_served_is_a_404_the_sdk_does_not_retry(bare_server: ApiServer) -> None:
    picture = ("in.png", png_bytes(100, 70), "image/png")
    requests: list[httpx.Request] = []
    http_client = httpx.Client(timeout=30.0, event_hooks={"request": [requests.append]})
    client = openai.OpenAI(
        base_url=f"{bare_server.base_url}/v1", api_key="x", http_client=http_client
    )  # 2 retries
    calls = {
        "flux.1-kontext-dev": lambda: client.images.edit(
            model="flux.1-kontext-dev", image=picture, prompt="p"
        ),
        "flux.1-krea-dev": lambda: client.images.generate(model="flux.1-krea-dev", prompt="p"),
    }
    with client:
        for model, call in calls.items():
            requests.clear()
            with pytest.raises(openai.NotFoundError) as caught:
                call()
            error = caught.value.body
            assert caught.value.status_code == 404 and len(requests) == 1  # not retried
            assert (error["code"], error["param"], error["type"]) == (
                "model_not_found",
                "model",
                "invalid_request_error",
            )
            variant = model.split("-")[1]
            assert f"--variant {variant}=PATH" in error["message"] and "FLUX_VARIANTS" in error["message"]
            assert f"The model '{model}'" in error["message"]
        assert [model.id for model in client.models.list().data] == ["flux.1-dev", "FLUX.1-dev"]
    assert bare_server.worker.depth() == 0
