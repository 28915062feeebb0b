"""The FLUX.1 [dev] family end to end: `flux-server serve --model tiny` with the tiny Fill,
Kontext, Krea and a tiny fine-tune (`--variant NAME=tiny`), driven by the real fal_client and
@fal-ai/client: every sub-path with its defaults, Kontext's resolution modes, Fill's
`paste_back` and `resize_to_original`, LoRAs on Kontext, Krea and Fill, a fine-tune under its
own app id, and the error of a checkpoint the server does not serve.

These need the worker side of issue 17 (branch h17/models: the variants' runtime, tiny
variants, `--variant`); the API side they drive is tested without a worker in
tests/server/api/protocols/fal/test_fal_family*.py.

Outputs are requested as PNG where a test compares pixels, so "the same image" is a byte or
pixel comparison of what the server returns.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from e2e_support import check_output, fetch_image, run_node_script
from lora_support import tiny_transformer
from PIL import Image

from models.lora.tiny_loras import write_lora

pytestmark = pytest.mark.timeout(600)

VARIANTS = ("fill", "kontext", "krea", "mystyle")
SMALL = {"image_size": {"width": 64, "height": 64}, "num_inference_steps": 2, "seed": 9}
KONTEXT_STEPS = 10  # Kontext's smallest step count (fal's range 10-50)


def picture(width: int, height: int) -> Image.Image:
    """Two colours, left and right: a paste-back is visible pixel for pixel."""
    image = Image.new("RGB", (width, height), (200, 80, 40))
    image.paste((30, 120, 220), (width // 2, 0, width, height))
    return image


def data_uri(image: Image.Image) -> str:
    import fal_client

    return fal_client.encode_image(image, format="png")


def right_half_mask(width: int, height: int) -> Image.Image:
    mask = Image.new("RGB", (width, height), (0, 0, 0))
    mask.paste((255, 255, 255), (width // 2, 0, width, height))
    return mask


@dataclass
class Family:
    server: object  # tests/conftest.FluxServer
    fal: object  # fal_client.SyncClient pointed at the server

    def client(self) -> httpx.Client:
        return self.server.client()  # type: ignore[attr-defined]

    def run(self, app: str, arguments: dict) -> dict:
        return self.fal.run(app, arguments)  # type: ignore[attr-defined]

    def image(self, output: dict) -> Image.Image:
        with self.client() as client:
            return fetch_image(client, output["images"][0]["url"])[0]


@pytest.fixture(scope="module")
def family(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, certs, launch_flux_server
) -> Iterator[Family]:
    root = tmp_path_factory.mktemp("family-e2e")
    library = root / "library"
    library.mkdir()
    write_lora(library / "style.safetensors", tiny_transformer(tiny_model_dir), seed=1)
    args = ["--lora-dir", str(library)]
    for name in VARIANTS:
        args += ["--variant", f"{name}=tiny"]
    server = launch_flux_server(root / "data", tiny_model_dir=tiny_model_dir, certs=certs, args=args)
    hostport = f"127.0.0.1:{server.port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(certs.bundle))
        patch.setenv("FAL_KEY", "anything")
        import fal_client
        import fal_client.client

        patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"https://{hostport}/run/")
        patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://{hostport}/")
        try:
            yield Family(server=server, fal=fal_client.SyncClient())
        finally:
            with contextlib.suppress(AssertionError):
                server.stop()


IMAGE_64 = picture(64, 64)
MASK_64 = right_half_mask(64, 64)

# app id -> (arguments beyond its defaults, expected (width, height), default content type)
SUB_PATHS: dict[str, tuple[dict, tuple[int, int], str]] = {
    "fal-ai/flux/krea": (SMALL, (64, 64), "image/jpeg"),
    "fal-ai/flux-1/krea": (SMALL, (64, 64), "image/jpeg"),
    "fal-ai/flux/krea/image-to-image": (
        {"image_url": IMAGE_64, "num_inference_steps": 10},
        (64, 64),
        "image/jpeg",
    ),
    "fal-ai/flux-1/krea/redux": ({"image_url": IMAGE_64, **SMALL}, (64, 64), "image/jpeg"),
    "fal-ai/flux-krea-lora": (SMALL, (64, 64), "image/jpeg"),
    "fal-ai/flux-krea-lora/image-to-image": (
        {"image_url": IMAGE_64, "num_inference_steps": 4},
        (64, 64),
        "image/jpeg",
    ),
    "fal-ai/flux-krea-lora/inpainting": (
        {"image_url": IMAGE_64, "mask_url": MASK_64, "num_inference_steps": 4},
        (64, 64),
        "image/jpeg",
    ),
    "fal-ai/flux-kontext/dev": (
        {"image_url": IMAGE_64, "num_inference_steps": KONTEXT_STEPS},
        (64, 64),
        "image/jpeg",
    ),
    "fal-ai/flux-kontext-lora": (
        {"image_url": IMAGE_64, "num_inference_steps": KONTEXT_STEPS},
        (64, 64),
        "image/png",
    ),
    "fal-ai/flux-kontext-lora/text-to-image": (
        {**SMALL, "num_inference_steps": KONTEXT_STEPS},
        (64, 64),
        "image/png",
    ),
    "fal-ai/flux-kontext-lora/inpaint": (
        {
            "image_url": IMAGE_64,
            "mask_url": MASK_64,
            "reference_image_url": picture(48, 48),
            "num_inference_steps": KONTEXT_STEPS,
        },
        (64, 64),
        "image/png",
    ),
    "fal-ai/flux-lora-fill": (
        {"image_url": IMAGE_64, "mask_url": MASK_64, "num_inference_steps": 2},
        (64, 64),
        "image/jpeg",
    ),
    "mystyle/flux/dev": (SMALL, (64, 64), "image/jpeg"),
    "mystyle/flux/dev/image-to-image": (
        {"image_url": IMAGE_64, "num_inference_steps": 10},
        (64, 64),
        "image/jpeg",
    ),
    "mystyle/flux-lora": (SMALL, (64, 64), "image/jpeg"),
}


def encoded(arguments: dict) -> dict:
    """Images as the data URIs fal_client.encode_image makes."""
    return {k: data_uri(v) if isinstance(v, Image.Image) else v for k, v in arguments.items()}


@pytest.mark.parametrize("app", list(SUB_PATHS))
def test_each_sub_path_generates_with_fal_client(family: Family, app: str) -> None:
    arguments, size, content_type = SUB_PATHS[app]
    prompt = "" if app == "fal-ai/flux-lora-fill" else "a lighthouse"
    body = encoded(arguments) | ({"prompt": prompt} if "redux" not in app else {})
    import fal_client

    handle = family.fal.submit(app, body)  # type: ignore[attr-defined]
    output = handle.get()
    owner, alias = app.split("/")[:2]
    assert isinstance(family.fal.status(app, handle.request_id), fal_client.Completed)  # type: ignore[attr-defined]
    assert handle.status_url.endswith(f"/{owner}/{alias}/requests/{handle.request_id}/status")
    with family.client() as client:
        check_output(client, output, size=size)
    assert output["images"][0]["content_type"] == content_type


def test_kontext_resolution_modes(family: Family) -> None:
    source = data_uri(picture(96, 64))
    # Each ~1 MP output takes over a minute on the CPU: "auto" stands for the ~1 MP modes here;
    # every ratio's size is checked at submit (tests/server/api/protocols/fal/test_fal_family.py)
    # and the worker generates the job's width x height whatever the mode.
    expected = {"match_input": (96, 64), "auto": (1248, 832)}
    for mode, size in expected.items():
        body = {"prompt": "make it night", "image_url": source, "resolution_mode": mode}
        output = family.run(
            "fal-ai/flux-kontext/dev", body | {"num_inference_steps": KONTEXT_STEPS, "seed": 3}
        )
        assert (output["images"][0]["width"], output["images"][0]["height"]) == size, mode
        assert family.image(output).size == size


def test_fill_paste_back_and_resize_to_original(family: Family) -> None:
    source, mask = picture(100, 70), right_half_mask(100, 70)
    body = {"image_url": data_uri(source), "mask_url": data_uri(mask), "output_format": "png", "seed": 4}
    body |= {"num_inference_steps": 2}
    pasted = family.image(family.run("fal-ai/flux-lora-fill", body))
    assert pasted.size == (96, 64)  # the input's size, rounded to 16
    # paste_back: the unmasked (left) part is the input's, pixel for pixel.
    kept = source.resize((96, 64)).crop((0, 0, 40, 64))
    assert pasted.convert("RGB").crop((0, 0, 40, 64)).tobytes() == kept.tobytes()
    raw = family.image(family.run("fal-ai/flux-lora-fill", body | {"paste_back": False}))
    assert raw.convert("RGB").crop((0, 0, 40, 64)).tobytes() != kept.tobytes()
    original = family.run("fal-ai/flux-lora-fill", body | {"resize_to_original": True})
    assert (original["images"][0]["width"], original["images"][0]["height"]) == (100, 70)
    assert family.image(original).size == (100, 70)


@pytest.mark.parametrize(
    ("app", "arguments"),
    [
        ("fal-ai/flux-krea-lora", SMALL),
        (
            "fal-ai/flux-kontext-lora",
            {"image_url": IMAGE_64, "num_inference_steps": KONTEXT_STEPS, "seed": 9},
        ),
        (
            "fal-ai/flux-lora-fill",
            {"image_url": IMAGE_64, "mask_url": MASK_64, "num_inference_steps": 2, "seed": 9},
        ),
    ],
)
def test_loras_change_kontext_krea_and_fill_and_leave_plain_requests_alone(
    family: Family, app: str, arguments: dict
) -> None:
    body = encoded(arguments) | {"prompt": "a lighthouse", "output_format": "png"}
    plain = family.image(family.run(app, body)).tobytes()
    styled = family.image(family.run(app, body | {"loras": [{"path": "style", "scale": 1.0}]})).tobytes()
    assert styled != plain
    assert family.image(family.run(app, body)).tobytes() == plain  # the LoRA did not stay loaded


def test_a_fine_tune_runs_its_own_weights(family: Family) -> None:
    body = SMALL | {"prompt": "a lighthouse", "output_format": "png"}
    base = family.image(family.run("fal-ai/flux/dev", body)).tobytes()
    tuned = family.image(family.run("mystyle/flux/dev", body)).tobytes()
    assert tuned != base
    assert family.image(family.run("mystyle/flux/dev", body)).tobytes() == tuned


def test_stream_and_sync_run_on_the_family(family: Family) -> None:
    body = encoded({"image_url": IMAGE_64, "num_inference_steps": KONTEXT_STEPS, "seed": 2}) | {"prompt": "p"}
    events = list(family.fal.stream("fal-ai/flux-kontext/dev", body))  # type: ignore[attr-defined]
    assert events and events[-1]["seed"] == 2 and events[-1]["images"]
    assert family.run("fal-ai/flux-kontext/dev", body)["seed"] == 2


def test_an_unserved_variant_is_a_404_naming_it(family: Family) -> None:
    import fal_client.client

    with pytest.raises(fal_client.client.FalClientHTTPError) as caught:
        family.run("othertune/flux/dev", SMALL | {"prompt": "p"})
    assert caught.value.status_code == 404 and caught.value.error_type == "variant_not_configured"
    assert "--variant othertune=PATH" in caught.value.message


def test_fal_js_client_runs_every_family_app(family: Family) -> None:
    cases = [
        {"app": app, "input": encoded(arguments) | ({"prompt": "p"} if "redux" not in app else {})}
        for app, (arguments, _, _) in SUB_PATHS.items()
    ]
    seen = run_node_script(family.server, "family.mjs", FAMILY_CASES=json.dumps(cases))
    assert [result["app"] for result in seen["results"]] == list(SUB_PATHS)
    with family.client() as client:
        for result in seen["results"]:
            _, size, content_type = SUB_PATHS[result["app"]]
            check_output(client, result["data"], size=size)
            assert result["data"]["images"][0]["content_type"] == content_type and result["requestId"]
        check_output(client, seen["stream"], size=SUB_PATHS[cases[0]["app"]][1])


def test_playground_runs_a_kontext_edit(family: Family, page, tmp_path: Path) -> None:
    """The playground's form for fal-ai/flux-kontext/dev, built from /openapi.json: its
    resolution_mode choices, an uploaded input, the edited image shown."""
    page, _ = page
    source = tmp_path / "input.png"
    picture(96, 64).save(source)
    page.goto(family.server.base_url + "/")  # type: ignore[attr-defined]
    page.wait_for_selector("#endpoint option[value='fal-ai/flux-kontext/dev']", state="attached")
    page.select_option("#endpoint", "fal-ai/flux-kontext/dev")
    modes = page.eval_on_selector_all("select[name=resolution_mode] option", "o => o.map(x => x.value)")
    assert {"match_input", "auto", "16:9", "9:21"} <= set(modes)
    page.fill("textarea[name=prompt]", "make it night")
    page.set_input_files("input[name='image_url.file']", str(source))
    page.wait_for_function(
        "document.querySelector('input[name=image_url]').value.startsWith('data:image/png')"
    )
    page.fill("input[name=num_inference_steps]", str(KONTEXT_STEPS))
    page.click("#generate")
    page.wait_for_function("document.querySelector('#images img')?.naturalWidth === 96")
