"""`--default-acceleration` on every protocol, over real HTTP (a real API process, the real
queue; the test claims the jobs as a worker would): set, it is the preset of every request
that names none (fal, BFL, OpenAI generations and edits); unset, each path keeps the default
its document gives (fal-ai/flux/dev "none", fal-ai/flux-1/dev "regular", BFL and OpenAI
"none"). A request that names a preset keeps it either way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.jobs import Job
from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server


@pytest.fixture(scope="module", params=[None, "regular", "high"], ids=["unset", "regular", "high"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    settings = api_settings(tmp_path_factory.mktemp("accel"), default_acceleration=request.param)
    with run_api_server(settings) as api:
        yield api


def queued_job(api: ApiServer, path: str, body: dict) -> Job:
    """Submit to a queue path (fal, BFL); the job as the worker claims it."""
    response = api.client.post(path, json=body)
    assert response.status_code == 200, response.text
    return api.claim().job


def waited_job(api: ApiServer, send: Callable[[], httpx.Response]) -> Job:
    """Submit to a path that answers only once the job is done (OpenAI): claim it meanwhile,
    complete it, and check the client got its images."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(send)
        record = api.claim(timeout=20)
        api.complete(record)
        response = answer.result(timeout=20)
    assert response.status_code == 200, response.text
    assert response.json()["data"]
    return record.job


def test_fal_requests_that_name_no_preset(server: ApiServer) -> None:
    operator = server.settings.default_acceleration
    assert queued_job(server, "/fal-ai/flux/dev", {"prompt": "p"}).acceleration == (operator or "none")
    aggregator = queued_job(server, "/fal-ai/flux-1/dev", {"prompt": "p", "acceleration": "default"})
    assert aggregator.acceleration == (operator or "regular")
    lora = queued_job(server, "/fal-ai/flux-lora", {"prompt": "p"})
    assert lora.acceleration == (operator or "none")
    named = queued_job(server, "/fal-ai/flux/dev", {"prompt": "p", "acceleration": "none"})
    assert named.acceleration == "none"


def test_bfl_requests_run_the_operators_default(server: ApiServer) -> None:
    operator = server.settings.default_acceleration
    job = queued_job(server, "/v1/flux-dev", {"prompt": "a red barn", "width": 256, "height": 256})
    assert job.protocol == "bfl"
    assert job.acceleration == (operator or "none")


def test_openai_generations_and_edits_run_the_operators_default(server: ApiServer) -> None:
    operator = server.settings.default_acceleration
    body = {"prompt": "a lighthouse", "size": "256x256"}
    generation = waited_job(server, lambda: server.client.post("/v1/images/generations", json=body))
    assert generation.protocol == "openai" and generation.acceleration == (operator or "none")
    picture = ("in.png", png_bytes(128, 96), "image/png")
    edit = waited_job(
        server,
        lambda: server.client.post("/v1/images/edits", data={"prompt": "winter"}, files={"image": picture}),
    )
    assert edit.task == "image-to-image" and edit.acceleration == (operator or "none")
