"""Every value the documents allow, over real HTTP: the aggregator path's extra spellings map
onto fal's values (same job as the canonical spelling), fal's own paths stay strict, and each
path's default acceleration is its own document's unless the operator sets one."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from server.jobs import Job
from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server

PNG_URI = "data:image/png;base64," + base64.b64encode(png_bytes(100, 70)).decode()
AGGREGATOR = "/fal-ai/flux-1/dev"
FAL = "/fal-ai/flux/dev"
# Fields that differ between any two submits and are not values of the request.
NOT_COMPARED = {"base_url", "app_id", "seed"}


def submitted_job(api: ApiServer, path: str, body: dict) -> Job:
    response = api.client.post(path, json=body)
    assert response.status_code == 200, response.text
    return api.worker.get(response.json()["request_id"]).job


def values(job: Job) -> dict:
    return job.model_dump(exclude=NOT_COMPARED)


@pytest.mark.parametrize(
    ("ratio", "preset", "size"),
    [
        ("3:4", "portrait_4_3", (768, 1024)),
        ("4:3", "landscape_4_3", (1024, 768)),
        ("16:9", "landscape_16_9", (1024, 576)),
        ("9:16", "portrait_16_9", (576, 1024)),
    ],
)
def test_aggregator_aspect_ratios_are_the_matching_presets(api, ratio, preset, size):
    by_ratio = submitted_job(api, AGGREGATOR, {"prompt": "p", "image_size": ratio, "seed": 1})
    by_preset = submitted_job(api, AGGREGATOR, {"prompt": "p", "image_size": preset, "seed": 1})
    assert (by_ratio.width, by_ratio.height) == size
    assert values(by_ratio) == values(by_preset)
    redux = submitted_job(api, AGGREGATOR + "/redux", {"image_url": PNG_URI, "image_size": ratio})
    assert (redux.width, redux.height) == size


@pytest.mark.parametrize("spelling", ["default", "DEFAULT", "JPEG", "jpeg", "Jpeg", " jpeg "])
def test_aggregator_output_format_default_and_any_case_jpeg_are_jpeg(api, spelling):
    job = submitted_job(api, AGGREGATOR, {"prompt": "p", "output_format": spelling})
    assert job.output_format == "jpeg"
    i2i = submitted_job(
        api, AGGREGATOR + "/image-to-image", {"prompt": "p", "image_url": PNG_URI, "output_format": spelling}
    )
    assert i2i.output_format == "jpeg"


@pytest.mark.parametrize("spelling", ["PNG", "Png", "png"])
def test_aggregator_png_in_any_case(api, spelling):
    assert submitted_job(api, AGGREGATOR, {"prompt": "p", "output_format": spelling}).output_format == "png"


def test_aggregator_acceleration_default_is_the_paths_documented_default(api):
    # The aggregator page: default "regular" for fal-ai/flux-1/dev, whether omitted or "default".
    for body in (
        {"prompt": "p"},
        {"prompt": "p", "acceleration": "default"},
        {"prompt": "p", "acceleration": "Default"},
    ):
        assert submitted_job(api, AGGREGATOR, body).acceleration == "regular"
    for preset in ("none", "regular", "high", "HIGH"):
        body = {"prompt": "p", "acceleration": preset}
        assert submitted_job(api, AGGREGATOR, body).acceleration == preset.lower()
    # The sub-paths are documented by fal only: "none".
    i2i = {"prompt": "p", "image_url": PNG_URI, "acceleration": "default"}
    assert submitted_job(api, AGGREGATOR + "/image-to-image", i2i).acceleration == "none"
    assert submitted_job(api, AGGREGATOR + "/redux", {"image_url": PNG_URI}).acceleration == "none"
    # fal's own page: "none".
    assert submitted_job(api, FAL, {"prompt": "p"}).acceleration == "none"


def test_the_seed_documents_example_body_is_accepted_as_is(api):
    body = {
        "prompt": "Extreme close-up of a single tiger eye, direct frontal view.",
        "image_size": "landscape_4_3",
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "num_images": 1,
        "enable_safety_checker": True,
        "output_format": "jpeg",
        "acceleration": "regular",
    }
    job = submitted_job(api, AGGREGATOR, body)
    assert (job.width, job.height, job.output_format, job.acceleration) == (1024, 768, "jpeg", "regular")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "p", "image_size": "3:4"}, "image_size"),
        ({"prompt": "p", "output_format": "JPEG"}, "output_format"),
        ({"prompt": "p", "output_format": "default"}, "output_format"),
        ({"prompt": "p", "acceleration": "default"}, "acceleration"),
        ({"prompt": "p", "acceleration": "HIGH"}, "acceleration"),
    ],
)
def test_fals_own_paths_stay_strict(api, body, field):
    response = api.client.post(FAL, json=body)
    assert response.status_code == 422, response.text
    assert [error["loc"] for error in response.json()["detail"]] == [["body", field]]
    assert api.worker.depth() == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "p", "image_size": "2:1"}, "image_size"),
        ({"prompt": "p", "output_format": "gif"}, "output_format"),
        ({"prompt": "p", "acceleration": "turbo"}, "acceleration"),
        ({"prompt": "p", "output_format": 3}, "output_format"),
    ],
)
def test_aggregator_still_refuses_values_no_document_allows(api, body, field):
    response = api.client.post(AGGREGATOR, json=body)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", field]
    if field == "image_size":  # the message offers the aspect ratios too
        assert "3:4" in error["msg"] and "portrait_4_3" in error["msg"]


@pytest.fixture(scope="module")
def operator_default(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    settings = api_settings(tmp_path_factory.mktemp("api-accel"), default_acceleration="high")
    with run_api_server(settings) as server:
        yield server


def test_the_operators_default_acceleration_wins_over_every_paths_default(operator_default):
    api = operator_default
    assert submitted_job(api, AGGREGATOR, {"prompt": "p"}).acceleration == "high"
    assert submitted_job(api, AGGREGATOR, {"prompt": "p", "acceleration": "default"}).acceleration == "high"
    assert submitted_job(api, FAL, {"prompt": "p"}).acceleration == "high"
    # A request that names a preset still gets it.
    assert submitted_job(api, FAL, {"prompt": "p", "acceleration": "none"}).acceleration == "none"
