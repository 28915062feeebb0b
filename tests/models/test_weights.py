"""resolve_model's checks, load_components, and offline enforcement, on copies of the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image

from models.weights import WeightsError, resolve_model
from models.weights.load import LoadedComponents, load_components
from models.weights.offline import OFFLINE_ENV, enforce_offline

# --------------------------------------------------------------------------- network guard

_network_attempts: list[str] = []
_guard_active = False


def _audit(event: str, args: tuple) -> None:
    if _guard_active and event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname"):
        _network_attempts.append(f"{event} {args!r}")
        raise ConnectionRefusedError(f"network access during an offline test: {event} {args!r}")


sys.addaudithook(_audit)  # audit hooks cannot be removed; the flag keeps it idle elsewhere


@contextmanager
def no_network() -> Iterator[None]:
    """Fail the test if the block tries to connect anywhere, even if a library swallows it."""
    global _guard_active
    _network_attempts.clear()
    _guard_active = True
    try:
        yield
    finally:
        _guard_active = False
    assert not _network_attempts, f"network attempted: {_network_attempts}"


def test_guard_catches_a_connection() -> None:
    import socket

    # The error is swallowed, as a library might do: the guard must still fail the block.
    with pytest.raises(AssertionError, match="network attempted"), no_network(), contextlib.suppress(OSError):
        socket.create_connection(("127.0.0.1", 9), timeout=1)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def model_copy(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A private copy of the tiny model folder to break in a test (about 1.3 MB)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "flux-copy"))


def assert_fails_fast(model: str, data_dir: Path, *fragments: str, components_dir: Path | None = None) -> str:
    started = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        resolve_model(model, data_dir=data_dir, components_dir=components_dir)
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- resolve_model


def test_tiny_spec(tiny_model_dir: Path) -> None:
    spec = resolve_model("tiny", data_dir=tiny_model_dir.parent)
    assert spec.kind == "tiny"
    assert spec.folder == tiny_model_dir
    assert spec.transformer_file is None
    assert spec.redux_dir == tiny_model_dir / "redux"
    assert spec.name == "tiny"


def test_diffusers_folder_spec(model_copy: Path, tmp_path: Path) -> None:
    spec = resolve_model(str(model_copy), data_dir=tmp_path)
    assert (spec.kind, spec.folder, spec.redux_dir, spec.name) == (
        "diffusers",
        model_copy,
        model_copy / "redux",
        "flux-copy",
    )
    shutil.rmtree(model_copy / "redux")
    assert resolve_model(str(model_copy), data_dir=tmp_path).redux_dir is None


@pytest.mark.parametrize("component", ["vae", "transformer", "text_encoder_2", "tokenizer", "scheduler"])
def test_missing_component_is_named(model_copy: Path, tmp_path: Path, component: str) -> None:
    shutil.rmtree(model_copy / component)
    assert_fails_fast(str(model_copy), tmp_path, f"the {component} component", str(model_copy / component))


def test_every_problem_is_listed(model_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(model_copy / "vae")
    (model_copy / "tokenizer_2" / "tokenizer.json").unlink()
    (model_copy / "text_encoder" / "config.json").unlink()
    message = assert_fails_fast(
        str(model_copy),
        tmp_path,
        "3 problems",
        str(model_copy / "vae"),
        str(model_copy / "tokenizer_2"),
        str(model_copy / "text_encoder" / "config.json"),
    )
    assert message.count("\n- ") == 3


def test_missing_weight_file_is_named(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "text_encoder_2" / "model.safetensors").unlink()
    assert_fails_fast(
        str(model_copy), tmp_path, "text_encoder_2 weights are missing", str(model_copy / "text_encoder_2")
    )


def test_missing_config_is_named(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "vae" / "config.json").unlink()
    assert_fails_fast(str(model_copy), tmp_path, "vae config", str(model_copy / "vae" / "config.json"))


def test_missing_tokenizer_file_is_named(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "tokenizer_2" / "tokenizer.json").unlink()
    assert_fails_fast(
        str(model_copy), tmp_path, "tokenizer_2", "spiece.model", str(model_copy / "tokenizer_2")
    )


def test_truncated_safetensors_is_named(model_copy: Path, tmp_path: Path) -> None:
    weights = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_fails_fast(str(model_copy), tmp_path, "truncated safetensors file", str(weights))


def test_garbage_safetensors_is_named(model_copy: Path, tmp_path: Path) -> None:
    weights = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"<html>403 Forbidden</html>" * 10)
    assert_fails_fast(str(model_copy), tmp_path, "corrupt safetensors file", str(weights))


def test_non_flux_model_is_rejected(model_copy: Path, tmp_path: Path) -> None:
    index_path = model_copy / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    index_path.write_text(json.dumps(index))
    assert_fails_fast(str(model_copy), tmp_path, "StableDiffusionPipeline", "not FLUX.1", "FluxPipeline")


def test_missing_model_index(model_copy: Path, tmp_path: Path) -> None:
    (model_copy / "model_index.json").unlink()
    assert_fails_fast(str(model_copy), tmp_path, "model_index.json is missing", str(model_copy))


def test_hub_name_points_to_fetch_script(tmp_path: Path) -> None:
    assert_fails_fast(
        "black-forest-labs/FLUX.1-dev", tmp_path, "not a local folder", "scripts/fetch_weights.py"
    )


def test_missing_path(tmp_path: Path) -> None:
    assert_fails_fast(str(tmp_path / "nowhere"), tmp_path, "does not exist", str(tmp_path / "nowhere"))


def test_incomplete_redux_is_named(model_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(model_copy / "redux" / "image_embedder")
    assert_fails_fast(
        str(model_copy), tmp_path, "image_embedder", str(model_copy / "redux" / "image_embedder")
    )


@pytest.fixture
def sharded_copy(model_copy: Path, tiny_model_dir: Path) -> Path:
    """The copy with its transformer saved in several shards plus an index, as FLUX.1 [dev] is."""
    transformer = FluxTransformer2DModel.from_pretrained(
        tiny_model_dir / "transformer", local_files_only=True
    )
    shutil.rmtree(model_copy / "transformer")
    transformer.save_pretrained(model_copy / "transformer", max_shard_size="150KB")
    assert len(list((model_copy / "transformer").glob("*.safetensors"))) > 2
    return model_copy


def test_sharded_weights_load(sharded_copy: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    spec = resolve_model(str(sharded_copy), data_dir=tmp_path)
    loaded = load_components(spec, dtype=torch.float32)
    original = FluxTransformer2DModel.from_pretrained(tiny_model_dir / "transformer", local_files_only=True)
    reference = original.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.transformer.state_dict().items())


def test_missing_shard_is_named(sharded_copy: Path, tmp_path: Path) -> None:
    shard = sorted((sharded_copy / "transformer").glob("*-of-*.safetensors"))[1]
    shard.unlink()
    assert_fails_fast(str(sharded_copy), tmp_path, "transformer weight shard is missing", str(shard))


# --------------------------------------------------------------------------- loading


def test_enforce_offline_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.utils.hub_utils
    import huggingface_hub.constants

    for name in OFFLINE_ENV:
        monkeypatch.setenv(name, "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(diffusers.utils.hub_utils, "HF_HUB_OFFLINE", False)
    enforce_offline()
    assert all(os.environ[name] == "1" for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert huggingface_hub.constants.is_offline_mode()
    assert diffusers.utils.hub_utils.HF_HUB_OFFLINE is True


class LazyModule(types.ModuleType):
    """Like transformers' `_LazyModule`: a name it lacks imports a submodule (here: records it)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> object:
        self.asked.append(name)
        raise AttributeError(name)


def test_enforce_offline_imports_nothing_through_lazy_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    lazy = LazyModule("transformers.models.fake_image_processing")
    holding = LazyModule("transformers.fake_hub_copy")
    holding.HF_HUB_OFFLINE = False  # a copy made at import time: switched, without a lookup
    monkeypatch.setitem(sys.modules, lazy.__name__, lazy)
    monkeypatch.setitem(sys.modules, holding.__name__, holding)
    before = set(sys.modules)
    enforce_offline()
    assert lazy.asked == [] and holding.asked == []  # __getattr__ never ran: nothing imported
    assert holding.HF_HUB_OFFLINE is True
    assert set(sys.modules) == before


def test_load_and_generate_without_network(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Even with the environment saying "online", loading must not try the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with no_network():
        spec = resolve_model("tiny", data_dir=tiny_model_dir.parent)
        components = load_components(spec, dtype=torch.float32)
        pipe = FluxPipeline(**components.pipeline_kwargs())
        image = pipe(
            "a red chair",
            height=64,
            width=48,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(1),
        ).images[0]
    assert isinstance(components, LoadedComponents)
    assert image.size == (48, 64)
    assert set(components.pipeline_kwargs()) == {
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    }


def test_redux_parts_load_and_run(tiny_model_dir: Path) -> None:
    from diffusers import FluxPriorReduxPipeline

    with no_network():
        components = load_components(
            resolve_model("tiny", data_dir=tiny_model_dir.parent), dtype=torch.float32
        )
        prior = FluxPriorReduxPipeline(
            image_encoder=components.redux_image_encoder,
            feature_extractor=components.redux_feature_extractor,
            image_embedder=components.redux_image_embedder,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            text_encoder_2=components.text_encoder_2,
            tokenizer_2=components.tokenizer_2,
        )
        out = prior(Image.new("RGB", (40, 40), (200, 30, 30)), prompt="")
    assert out.prompt_embeds.shape[-1] == 32
    assert out.pooled_prompt_embeds.shape == (1, 32)


def test_load_without_redux(model_copy: Path, tmp_path: Path) -> None:
    shutil.rmtree(model_copy / "redux")
    components = load_components(resolve_model(str(model_copy), data_dir=tmp_path), dtype=torch.bfloat16)
    assert components.redux_image_encoder is None
    assert components.redux_image_embedder is None
    assert components.transformer.dtype == torch.bfloat16
    assert components.text_encoder_2.dtype == torch.bfloat16
