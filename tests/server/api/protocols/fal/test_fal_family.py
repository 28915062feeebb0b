"""The FLUX.1 [dev] family's fal endpoints over real HTTP (Fill, Kontext, Krea, their LoRA apps,
fine-tunes under their own owner): the Job each submit makes with fal's defaults, the stored
input images, fal's ranges as 422s, and the 404 for a checkpoint the server does not serve.
The worker's side of these jobs is tested end to end in tests/e2e/test_family_generation.py."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from server.jobs import Job, LoraRef
from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server

VARIANTS = {"fill": "tiny", "kontext": "tiny", "krea": "tiny", "mystyle": "tiny"}


def data_uri(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, color)).decode()


IMAGE = data_uri(100, 70)
MASK = data_uri(100, 70, (255, 255, 255))
REFERENCE = data_uri(1600, 1200, (20, 90, 200))


@pytest.fixture(scope="module")
def family_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with run_api_server(api_settings(tmp_path_factory.mktemp("family"), variants=VARIANTS)) as server:
        yield server


@pytest.fixture
def api(family_server: ApiServer) -> Iterator[ApiServer]:
    family_server.drain()
    yield family_server
    family_server.drain()


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """Real weights and no variant configured: only the base model (the API loads no weights)."""
    settings = api_settings(tmp_path_factory.mktemp("bare"), model="/weights/FLUX.1-dev")
    with run_api_server(settings) as server:
        yield server


def submitted(api: ApiServer, path: str, body: dict) -> tuple[dict, Job]:
    """The submit's answer and the job as the worker that claims it gets it (inputs included)."""
    response = api.client.post(path, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer, api.claim(answer["request_id"]).job


def size_of(png: bytes | None) -> tuple[int, int]:
    assert png is not None
    return Image.open(io.BytesIO(png)).size


PROMPT = {"prompt": "p"}
EDIT = {"prompt": "p", "image_url": IMAGE}
INPAINT = {"prompt": "p", "image_url": IMAGE, "mask_url": MASK}
REDUX = {"image_url": IMAGE}
FILL = {"image_url": IMAGE, "mask_url": MASK}
KONTEXT_INPAINT = {**INPAINT, "reference_image_url": REFERENCE}
T2I_SIZE, INPUT_SIZE = (1024, 768), (96, 64)  # landscape_4_3; the 100x70 input rounded to 16

# (path, body, task, variant, steps, guidance, output format, (width, height))
DEFAULTS = [
    ("/fal-ai/flux/krea", PROMPT, "text-to-image", "krea", 28, 4.5, "jpeg", T2I_SIZE),
    ("/fal-ai/flux-1/krea", PROMPT, "text-to-image", "krea", 28, 4.5, "jpeg", T2I_SIZE),
    ("/fal-ai/flux/krea/image-to-image", EDIT, "image-to-image", "krea", 40, 4.5, "jpeg", INPUT_SIZE),
    ("/fal-ai/flux-1/krea/image-to-image", EDIT, "image-to-image", "krea", 40, 4.5, "jpeg", INPUT_SIZE),
    ("/fal-ai/flux/krea/redux", REDUX, "redux", "krea", 28, 4.5, "jpeg", T2I_SIZE),
    ("/fal-ai/flux-1/krea/redux", REDUX, "redux", "krea", 28, 4.5, "jpeg", T2I_SIZE),
    ("/fal-ai/flux-krea-lora", PROMPT, "text-to-image", "krea", 28, 3.5, "jpeg", T2I_SIZE),
    ("/fal-ai/flux-krea-lora/image-to-image", EDIT, "image-to-image", "krea", 28, 3.5, "jpeg", INPUT_SIZE),
    ("/fal-ai/flux-krea-lora/inpainting", INPAINT, "inpainting", "krea", 28, 3.5, "jpeg", INPUT_SIZE),
    ("/fal-ai/flux-kontext/dev", EDIT, "edit", "kontext", 28, 2.5, "jpeg", INPUT_SIZE),
    ("/fal-ai/flux-kontext-lora", EDIT, "edit", "kontext", 30, 2.5, "png", INPUT_SIZE),
    ("/fal-ai/flux-kontext-lora/text-to-image", PROMPT, "text-to-image", "kontext", 30, 2.5, "png", T2I_SIZE),
    (
        "/fal-ai/flux-kontext-lora/inpaint",
        KONTEXT_INPAINT,
        "edit-inpainting",
        "kontext",
        30,
        2.5,
        "png",
        INPUT_SIZE,
    ),
    ("/fal-ai/flux-lora-fill", FILL, "fill", "fill", 28, 30.0, "jpeg", INPUT_SIZE),
    # Fine-tunes: fal-ai's base-model endpoints under the fine-tune's own owner.
    ("/mystyle/flux/dev", PROMPT, "text-to-image", "mystyle", 28, 3.5, "jpeg", T2I_SIZE),
    ("/mystyle/flux/dev/image-to-image", EDIT, "image-to-image", "mystyle", 40, 3.5, "jpeg", INPUT_SIZE),
    ("/mystyle/flux-1/dev/redux", REDUX, "redux", "mystyle", 28, 3.5, "jpeg", T2I_SIZE),
    ("/mystyle/flux-lora", PROMPT, "text-to-image", "mystyle", 28, 3.5, "jpeg", T2I_SIZE),
    ("/mystyle/flux-lora/inpainting", INPAINT, "inpainting", "mystyle", 28, 3.5, "jpeg", INPUT_SIZE),
]


@pytest.mark.parametrize(
    ("path", "body", "task", "variant", "steps", "guidance", "output_format", "size"),
    DEFAULTS,
    ids=[row[0] for row in DEFAULTS],
)
def test_each_endpoint_builds_its_job_with_fals_defaults(
    api: ApiServer, path, body, task, variant, steps, guidance, output_format, size
) -> None:
    answer, job = submitted(api, path, body)
    owner, app, *endpoint = path.strip("/").split("/")
    app_id = f"{owner}/{app}"
    assert (job.app_id, job.endpoint, job.task, job.variant) == (app_id, "/".join(endpoint), task, variant)
    assert (job.num_inference_steps, job.guidance_scale, job.output_format) == (
        steps,
        guidance,
        output_format,
    )
    assert (job.width, job.height) == size
    assert (job.num_images, job.acceleration, job.enable_safety_checker, job.inline_images) == (
        1,
        "none",
        True,
        False,
    )
    # Status, result and cancel live under the app id the client used (its owner and app).
    assert answer["status_url"] == f"{api.base_url}/{app_id}/requests/{answer['request_id']}/status"
    status = api.client.get(answer["status_url"].removeprefix(api.base_url))
    assert status.status_code == 202 and status.json()["status"] == "IN_PROGRESS"
    assert (job.image is not None) == ("image_url" in body)
    assert (job.mask is not None) == ("mask_url" in body)
    assert (job.reference_image is not None) == ("reference_image_url" in body)


def test_another_apps_status_route_does_not_find_the_request(api: ApiServer) -> None:
    answer, _ = submitted(api, "/mystyle/flux/dev", {"prompt": "p"})
    request_id = answer["request_id"]
    assert api.client.get(f"/mystyle/flux/requests/{request_id}/status").status_code == 202
    assert api.client.get(f"/fal-ai/flux/requests/{request_id}/status").status_code == 404
    assert api.client.get(f"/other/flux/requests/{request_id}/status").status_code == 404


def test_kontext_resolution_modes(api: ApiServer) -> None:
    picture = data_uri(1000, 750)
    cases = {
        "match_input": ((1008, 752), (1000, 750)),  # the input's, rounded to 16; stored as sent
        "auto": ((1184, 880), (1000, 750)),  # diffusers' preferred resolution nearest 4:3
        "1:1": ((1024, 1024), (1000, 750)),
        "16:9": ((1360, 768), (1000, 750)),
        "9:21": ((656, 1552), (1000, 750)),
    }
    for mode, (output, stored) in cases.items():
        _, job = submitted(
            api, "/fal-ai/flux-kontext/dev", {"prompt": "p", "image_url": picture, "resolution_mode": mode}
        )
        assert (job.resolution_mode, (job.width, job.height), size_of(job.image)) == (mode, output, stored), (
            mode
        )
    # A large input: match_input scales it into the bounds; the other modes store at most ~1 MP.
    large = data_uri(3000, 2000)
    _, job = submitted(api, "/fal-ai/flux-kontext-lora", {"prompt": "p", "image_url": large})
    assert (job.width, job.height) == (2048, 1360) and size_of(job.image) == (2048, 1360)
    _, job = submitted(
        api, "/fal-ai/flux-kontext/dev", {"prompt": "p", "image_url": large, "resolution_mode": "auto"}
    )
    assert (job.width, job.height) == (1248, 832) and size_of(job.image) == (1254, 836)


def test_kontext_inpaint_stores_image_mask_and_reference(api: ApiServer) -> None:
    body = {"prompt": "p", "image_url": data_uri(1000, 750), "mask_url": data_uri(500, 375, (255, 255, 255))}
    body |= {
        "reference_image_url": REFERENCE,
        "strength": 0.7,
        "loras": [{"path": "https://lan/k.safetensors"}],
    }
    _, job = submitted(api, "/fal-ai/flux-kontext-lora/inpaint", body)
    assert (job.task, job.strength, job.width, job.height) == ("edit-inpainting", 0.7, 1008, 752)
    assert size_of(job.image) == (1000, 750) and size_of(job.mask) == (500, 375)
    assert size_of(job.reference_image) == (1182, 886)  # 1600x1200 at Kontext's ~1 MP
    assert job.loras == (LoraRef(path="https://lan/k.safetensors"),)
    without = {key: value for key, value in body.items() if key not in ("strength", "loras")}
    _, job = submitted(api, "/fal-ai/flux-kontext-lora/inpaint", without)
    assert job.strength == 0.88


def test_fill_sizes_paste_back_and_resize_to_original(api: ApiServer) -> None:
    body = {"image_url": data_uri(1000, 750), "mask_url": data_uri(1000, 750, (255, 255, 255))}
    _, job = submitted(api, "/fal-ai/flux-lora-fill", body)
    assert (job.width, job.height, job.prompt, job.paste_back, job.resize_to_original) == (
        1008,
        752,
        "",
        True,
        False,
    )
    # The image keeps its own size (what resize_to_original restores); the mask is stored with it.
    assert size_of(job.image) == (1000, 750) and Image.open(io.BytesIO(job.mask)).mode == "L"
    body |= {"prompt": "a window", "image_size": "square", "paste_back": False, "resize_to_original": True}
    body |= {"loras": [{"path": "https://lan/fill.safetensors", "scale": 0.5}], "guidance_scale": 35}
    _, job = submitted(api, "/fal-ai/flux-lora-fill", body)
    assert (job.width, job.height, job.prompt, job.paste_back, job.resize_to_original) == (
        512, 512, "a window", False, True,
    )  # fmt: skip
    assert size_of(job.image) == (1000, 750) and job.guidance_scale == 35
    assert job.loras == (LoraRef(path="https://lan/fill.safetensors", scale=0.5),)
    # An input over the bounds is scaled into them: image, mask and output alike.
    large = {"image_url": data_uri(3000, 2000), "mask_url": data_uri(3000, 2000, (255, 255, 255))}
    _, job = submitted(api, "/fal-ai/flux-lora-fill", large)
    assert (job.width, job.height) == (2048, 1360)
    assert size_of(job.image) == size_of(job.mask) == (2048, 1365)


def test_loras_reach_every_lora_app(api: ApiServer) -> None:
    loras = [{"path": "https://lan/a.safetensors", "scale": 0.8}, {"path": "studio/b"}]
    for path, body in (
        ("/fal-ai/flux-krea-lora", {"prompt": "p"}),
        ("/fal-ai/flux-kontext-lora", {"prompt": "p", "image_url": IMAGE}),
        ("/fal-ai/flux-kontext-lora/text-to-image", {"prompt": "p"}),
        ("/fal-ai/flux-lora-fill", {"image_url": IMAGE, "mask_url": MASK}),
        ("/mystyle/flux-lora", {"prompt": "p"}),
    ):
        _, job = submitted(api, path, {**body, "loras": loras})
        assert job.loras == (
            LoraRef(path="https://lan/a.safetensors", scale=0.8),
            LoraRef(path="studio/b"),
        ), path


def test_accelerations_and_explicit_values(api: ApiServer) -> None:
    _, job = submitted(
        api, "/fal-ai/flux-kontext-lora", {"prompt": "p", "image_url": IMAGE, "acceleration": "high"}
    )
    assert job.acceleration == "high"
    body = {"prompt": "p", "seed": 11, "num_images": 4, "num_inference_steps": 10, "guidance_scale": 1}
    body |= {
        "output_format": "png",
        "sync_mode": True,
        "enable_safety_checker": False,
        "image_size": "square_hd",
    }
    _, job = submitted(api, "/fal-ai/flux/krea", body | {"acceleration": "regular"})
    assert (job.seed, job.num_images, job.num_inference_steps, job.guidance_scale) == (11, 4, 10, 1)
    assert (job.output_format, job.inline_images, job.enable_safety_checker) == ("png", True, False)
    assert (job.width, job.height, job.acceleration) == (1024, 1024, "regular")


KONTEXT, KONTEXT_LORA, FILL_APP = (
    "/fal-ai/flux-kontext/dev",
    "/fal-ai/flux-kontext-lora",
    "/fal-ai/flux-lora-fill",
)
RANGES = [
    (KONTEXT, {**EDIT, "num_inference_steps": 9}, "num_inference_steps"),
    (KONTEXT, {**EDIT, "num_inference_steps": 51}, "num_inference_steps"),
    (KONTEXT, {**EDIT, "guidance_scale": 0.5}, "guidance_scale"),
    (KONTEXT, {**EDIT, "resolution_mode": "2:1"}, "resolution_mode"),
    (KONTEXT, PROMPT, "image_url"),
    (KONTEXT, {**EDIT, "num_images": 5}, "num_images"),
    (KONTEXT_LORA, {**EDIT, "acceleration": "max"}, "acceleration"),
    (KONTEXT_LORA, {**EDIT, "guidance_scale": 21}, "guidance_scale"),
    (KONTEXT_LORA + "/text-to-image", {**PROMPT, "num_inference_steps": 5}, "num_inference_steps"),
    (KONTEXT_LORA + "/inpaint", INPAINT, "reference_image_url"),
    (KONTEXT_LORA + "/inpaint", {**KONTEXT_INPAINT, "strength": 0}, "strength"),
    (FILL_APP, {**FILL, "guidance_scale": 27.9}, "guidance_scale"),
    (FILL_APP, {**FILL, "guidance_scale": 35.1}, "guidance_scale"),
    (FILL_APP, {**FILL, "acceleration": "high"}, "acceleration"),
    (FILL_APP, REDUX, "mask_url"),
    (FILL_APP, {**FILL, "fill_image": {"fill_image_url": IMAGE}}, "fill_image"),
    (FILL_APP, {**FILL, "image_size": "huge"}, "image_size"),
    (FILL_APP, {**FILL, "image_url": data_uri(40, 40)}, "image_url"),
    ("/fal-ai/flux/krea", {**PROMPT, "guidance_scale": 20.5}, "guidance_scale"),
    ("/fal-ai/flux/krea", {**PROMPT, "num_inference_steps": 0}, "num_inference_steps"),
    ("/fal-ai/flux-1/krea/image-to-image", {**EDIT, "num_inference_steps": 9}, "num_inference_steps"),
    ("/fal-ai/flux-krea-lora", {**PROMPT, "acceleration": "high"}, "acceleration"),
    ("/fal-ai/flux-krea-lora/inpainting", EDIT, "mask_url"),
    ("/mystyle/flux/dev", {**PROMPT, "num_images": 9}, "num_images"),
]


@pytest.mark.parametrize(("path", "body", "field"), RANGES, ids=[f"{r[0]}:{r[2]}" for r in RANGES])
def test_out_of_range_fields_are_fal_422s(api: ApiServer, path: str, body: dict, field: str) -> None:
    response = api.client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and all({"loc", "msg", "type"} <= set(entry) for entry in detail)
    assert any(entry["loc"][:2] == ["body", field] for entry in detail), detail
    assert api.worker.depth() == 0  # nothing was queued


def test_unknown_apps_endpoints_and_owners_are_404(api: ApiServer) -> None:
    cases = {
        "/mystyle/flux/krea": "a fine-tune serves the endpoints of fal-ai/flux that run on the base model",
        "/mystyle/flux-kontext/dev": "a fine-tune serves the endpoints of fal-ai/flux-kontext",
        "/fal-ai/flux-kontext/pro": "Endpoint 'pro' of 'fal-ai/flux-kontext' not found",
        "/fal-ai/flux-kontext-lora/edit": "Endpoint 'edit'",
        "/workflows/flux/dev": "Application 'workflows/flux' not found",  # a fal client namespace
        "/krea/flux/dev": "Application 'krea/flux' not found",  # a family member is no fine-tune
        "/mystyle/sdxl/dev": "Application 'mystyle/sdxl' not found",
    }
    for path, message in cases.items():
        response = api.client.post(path, json={"prompt": "p"})
        assert response.status_code == 404 and message in response.json()["detail"], (path, response.text)


FAMILY_PATHS = [
    ("/fal-ai/flux/krea", "krea"),
    ("/fal-ai/flux-1/krea/image-to-image", "krea"),
    ("/fal-ai/flux/krea/redux", "krea"),
    ("/fal-ai/flux-krea-lora", "krea"),
    ("/fal-ai/flux-krea-lora/inpainting", "krea"),
    ("/fal-ai/flux-kontext/dev", "kontext"),
    ("/fal-ai/flux-kontext-lora", "kontext"),
    ("/fal-ai/flux-kontext-lora/text-to-image", "kontext"),
    ("/fal-ai/flux-kontext-lora/inpaint", "kontext"),
    ("/fal-ai/flux-lora-fill", "fill"),
    ("/mystyle/flux/dev", "mystyle"),
    ("/mystyle/flux-lora/image-to-image", "mystyle"),
]


@pytest.mark.parametrize(("path", "variant"), FAMILY_PATHS, ids=[p for p, _ in FAMILY_PATHS])
def test_an_unserved_checkpoint_is_a_404_naming_the_variant_and_the_setting(
    bare_server: ApiServer, path: str, variant: str
) -> None:
    """On the queue, the sync run, its stream and the JS proxy alike; the body is not even
    read (an invalid one gets the same answer) and nothing is queued."""
    proxied = {"x-fal-target-url": f"https://queue.fal.run{path}"}
    for route, headers in (
        (path, {}),
        (f"/run{path}", {}),
        (f"/run{path}/stream", {}),
        ("/api/fal/proxy", proxied),
    ):
        response = bare_server.client.post(route, json={"not": "valid"}, headers=headers)
        assert response.status_code == 404, (route, response.text)
        body = response.json()
        assert body["error_type"] == "variant_not_configured"
        assert response.headers["x-fal-error-type"] == "variant_not_configured"
        assert f"--variant {variant}=PATH" in body["detail"] and "FLUX_VARIANTS" in body["detail"]
        assert f"'{variant}' checkpoint" in body["detail"]
    assert bare_server.worker.depth() == 0


def test_the_tiny_model_alone_serves_every_tiny_variant(tmp_path: Path) -> None:
    """`--model tiny` with no --variant: the tiny Fill, Kontext, Krea and fine-tune
    ("tiny-finetune") are served, so that every endpoint works without weights."""
    with run_api_server(api_settings(tmp_path)) as server:
        for path, body, variant in (
            ("/fal-ai/flux-kontext/dev", EDIT, "kontext"),
            ("/fal-ai/flux-lora-fill", FILL, "fill"),
            ("/fal-ai/flux/krea", PROMPT, "krea"),
            ("/tiny-finetune/flux/dev", PROMPT, "tiny-finetune"),
        ):
            assert server.claim(server.submit(path, body)["request_id"]).job.variant == variant, path
        assert server.client.post("/mystyle/flux/dev", json=PROMPT).status_code == 404


def test_the_base_endpoints_need_no_variant(bare_server: ApiServer) -> None:
    for path in ("/fal-ai/flux/dev", "/fal-ai/flux-1/dev", "/fal-ai/flux-lora"):
        answer = bare_server.submit(path, {"prompt": "p"})
        record = bare_server.claim(answer["request_id"])
        assert record.job.variant == "dev"
        bare_server.complete(record)


def test_sync_run_and_webhook_on_a_fine_tune(api: ApiServer) -> None:
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(api.client.post, "/run/mystyle/flux/dev", json={"prompt": "p", "seed": 3})
        record = api.claim()
        assert (record.job.app_id, record.job.variant) == ("mystyle/flux", "mystyle")
        api.complete(record)
        response = running.result(timeout=20)
    assert response.status_code == 200 and response.json()["seed"] == 3
    assert response.headers["x-fal-request-id"] == record.id
    hook = "https://hooks.example.test/done"
    answer = api.submit(
        "/fal-ai/flux-kontext/dev", {"prompt": "p", "image_url": IMAGE}, params={"fal_webhook": hook}
    )
    job = api.claim(answer["request_id"]).job
    assert job.webhook is not None and job.webhook.url == hook and job.variant == "kontext"


def test_openapi_documents_each_endpoint_with_its_variant(api: ApiServer, bare_server: ApiServer) -> None:
    served = api.client.get("/openapi.json").json()["paths"]
    unserved = bare_server.client.get("/openapi.json").json()["paths"]
    for path, variant in FAMILY_PATHS:
        for kind in ("", "/run", "/run/stream"):
            route = f"/run{path}/stream" if kind == "/run/stream" else f"{kind}{path}"
            operation = served[route]["post"]
            assert operation["x-flux-variant"] == variant and operation["x-flux-variant-served"] is True
            if not path.startswith("/mystyle/"):  # a fine-tune that is not configured is not listed
                assert unserved[route]["post"]["x-flux-variant-served"] is False
    assert "/mystyle/flux/dev" not in unserved and "/mystyle/flux/requests/{request_id}/status" in served
    fill = served["/fal-ai/flux-lora-fill"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = api.client.get("/openapi.json").json()["components"]["schemas"][fill["$ref"].rsplit("/", 1)[1]]
    assert (
        schema["properties"]["guidance_scale"]["minimum"] == 28
        and schema["properties"]["guidance_scale"]["maximum"] == 35
    )
    assert schema["properties"]["paste_back"]["default"] is True and schema["required"] == [
        "image_url",
        "mask_url",
    ]
