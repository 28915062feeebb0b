"""`--model synthetic`: FLUX.1 [dev]'s architecture with random weights, on the CPU.

The full size is only counted on the meta device (11.9 B parameters would not fit the test
machine); the runtime tests build a synthetic model with the full widths and one block of each
kind, through exactly the code `--model synthetic` uses.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.loading import compute_dtype, load_runtime
from models.request import GenerationRequest
from models.runtime import FluxRuntime
from models.weights import WeightsError, resolve_model
from models.weights.synthetic import T5, SyntheticSpec, parameter_count, parse_synthetic

REPO = Path(__file__).resolve().parents[2]
SMALL = "synthetic:layers=1,single_layers=1,t5_layers=1,clip_layers=1,siglip_layers=1"


def test_names_and_overrides() -> None:
    assert parse_synthetic("synthetic") == SyntheticSpec(19, 38, 24, 12, 27)
    spec = parse_synthetic("synthetic:layers=2, single_layers=3")
    assert (spec.layers, spec.single_layers, spec.t5_layers) == (2, 3, 24)
    assert spec.name == "synthetic:layers=2,single_layers=3"
    assert SyntheticSpec().name == "synthetic"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("synthetic:depth=3", "expected one of layers, single_layers"),
        ("synthetic:layers", "expected one of"),
        ("synthetic:layers=0", "whole number 1..64"),
        ("synthetic:layers=two", "whole number 1..64"),
        ("synthetic:layers=65", "whole number 1..64"),
    ],
)
def test_bad_overrides_fail_the_preflight(model: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=message):
        resolve_model(model, data_dir=tmp_path)


def test_the_preflight_is_torch_free_and_writes_nothing(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from models.weights import resolve_model; "
        f"spec = resolve_model('synthetic:layers=2', data_dir=Path({str(tmp_path)!r})); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(spec.kind, spec.name)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["synthetic", "synthetic:layers=2"]
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_a_bad_override_before_any_worker_starts(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "server.supervisor.cli", "serve", "--model", "synthetic:depth=3"]
    command += ["--data-dir", str(tmp_path / "data"), "--port", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--model synthetic:depth=3: synthetic override 'depth=3'" in done.stderr


def test_the_full_size_is_flux_dev_counted_on_the_meta_device() -> None:
    assert abs(parameter_count(SyntheticSpec()) / 11.9e9 - 1) < 0.005
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(**T5, num_layers=24))
    assert 4.6e9 < sum(p.numel() for p in t5.parameters()) < 4.9e9  # T5-XXL's encoder, ~9.5 GB in bf16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    (root / tiny_model_dir.name).symlink_to(tiny_model_dir, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def runtime(data_dir: Path) -> FluxRuntime:
    return load_runtime(SMALL, data_dir=data_dir, device="cpu")


def test_full_widths_random_bf16_weights_no_file_and_no_safety_checker(
    runtime: FluxRuntime, data_dir: Path
) -> None:
    pipe = runtime.pipe
    config = pipe.transformer.config
    assert (config.num_layers, config.num_single_layers) == (1, 1)
    assert config.num_attention_heads * config.attention_head_dim == 3072
    assert (config.joint_attention_dim, config.pooled_projection_dim) == (4096, 768)
    assert pipe.text_encoder_2.config.d_model == 4096 and pipe.text_encoder.config.hidden_size == 768
    assert tuple(pipe.vae.config.block_out_channels) == (128, 256, 512, 512)
    for module in (
        pipe.transformer,
        pipe.text_encoder,
        pipe.text_encoder_2,
        pipe.vae,
        runtime.redux.image_encoder,
    ):
        assert {p.dtype for p in module.parameters()} == {compute_dtype("cpu", synthetic=True)}
    assert runtime.model_name == SMALL and runtime.model_kind == "synthetic"
    assert runtime.tasks == ("text-to-image", "image-to-image", "inpainting", "redux")
    assert not runtime.safety_checker_configured
    assert "random weights" in runtime.summary and "no safety checker" in runtime.summary
    written = [p for p in data_dir.rglob("*") if p.is_file() and "tiny-flux" not in p.parts]
    assert not [p for p in written if p.suffix in (".safetensors", ".bin", ".pt")]


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest(
        **{"prompt": "a red cat", "width": 64, "height": 64, "steps": 1, "seed": 5, **fields}
    )


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_task_runs_and_the_same_seed_gives_the_same_bytes(runtime: FluxRuntime) -> None:
    first = runtime.generate(request())
    assert [im.size for im in first.images] == [(64, 64)] and first.nsfw_checked is False
    assert png(runtime.generate(request()).images[0]) == png(first.images[0])
    source = png(Image.new("RGB", (80, 64), (200, 30, 30)))
    edited = runtime.generate(request(task="image-to-image", image=source, strength=1.0))
    assert [im.size for im in edited.images] == [(64, 64)]
    redux = runtime.generate(request(task="redux", image=source, prompt=""))
    assert [im.size for im in redux.images] == [(64, 64)]


@pytest.mark.parametrize("asked", ["regular", "high"])
def test_every_preset_reports_its_fallback(runtime: FluxRuntime, asked: str) -> None:
    # On a CPU only `none` is enabled by default: the others run it and say why.
    out = runtime.generate(request(acceleration=asked))
    assert out.preset == "none"
    assert out.preset_note == f"preset {asked!r} is not enabled on this server (enabled: none); ran 'none'"
