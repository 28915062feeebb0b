"""resolve_variants: every kind of variant a server accepts, and the problems it names (no torch
needed to check; the fixtures are written with torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from models.single_file import diffusers_to_bfl
from models.variants.spec import DEFAULT_TINY_VARIANTS, configured_variants, resolve_variants
from models.variants.tiny import ensure_tiny_variants
from models.weights.check import WeightsError


@pytest.fixture(scope="module")
def tiny_variants(tiny_model_dir: Path) -> Path:
    return ensure_tiny_variants(tiny_model_dir.parent)


@pytest.fixture(scope="module")
def base_config(tiny_model_dir: Path) -> dict:
    return json.loads((tiny_model_dir / "transformer" / "config.json").read_text())


def single_file(tiny_variants: Path, kind: str, dest: Path) -> Path:
    """The tiny `kind` transformer as one file in BFL's layout (as flux1-fill-dev.safetensors)."""
    state = load_file(str(tiny_variants / kind / "diffusion_pytorch_model.safetensors"))
    save_file(diffusers_to_bfl(state, prefix="model.diffusion_model."), str(dest))
    return dest


def test_tiny_serves_every_tiny_variant_by_default() -> None:
    assert configured_variants({}, model="tiny") == dict.fromkeys(DEFAULT_TINY_VARIANTS, "tiny")
    assert configured_variants({"krea": "tiny"}, model="tiny") == {"krea": "tiny"}
    assert configured_variants({}, model="/w/flux") == {}


def test_every_kind_of_path(tiny_variants: Path, base_config: dict, tmp_path: Path) -> None:
    pipeline_folder = tmp_path / "FLUX.1-Kontext-dev"
    shutil.copytree(tiny_variants / "kontext", pipeline_folder / "transformer")
    specs = resolve_variants(
        {
            "kontext": str(pipeline_folder),  # a diffusers folder
            "krea": str(tiny_variants / "krea"),  # a bare transformer folder
            "fill": str(single_file(tiny_variants, "fill", tmp_path / "fill.safetensors")),
            "my-style": str(single_file(tiny_variants, "finetune", tmp_path / "mine.safetensors")),
        },
        model="/w/dev",
        base_transformer_config=base_config,
    )
    assert {n: (s.architecture, s.source) for n, s in specs.items()} == {
        "kontext": ("kontext", "folder"),
        "krea": ("dev", "folder"),
        "fill": ("fill", "single-file"),
        "my-style": ("dev", "single-file"),
    }
    assert specs["kontext"].path == pipeline_folder / "transformer"


def test_every_problem_is_named_with_its_variant(
    tiny_variants: Path, base_config: dict, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError) as caught:
        resolve_variants(
            {
                "fill": str(tiny_variants / "krea"),  # 64 wide: not a Fill checkpoint
                "krea": str(tiny_variants / "fill"),  # a Fill checkpoint under another name
                "kontext": str(tmp_path / "missing"),
                "mine": "someone/flux-finetune",  # a hub name: never downloaded
                "dev": str(tiny_variants / "krea"),  # the base's own name
                "odd": str(empty),
                "Bad Name": str(tiny_variants / "krea"),
            },
            model="/w/dev",
            base_transformer_config=base_config,
        )
    message = str(caught.value)
    assert message.startswith("7 variant problems")
    assert "variant 'fill':" in message and "needs 384" in message
    assert "variant 'krea':" in message and "configure it as 'fill'" in message
    assert "variant 'kontext': the path does not exist" in message and "--variant kontext" in message
    assert "variant 'mine':" in message and "never downloads" in message
    assert "variant 'dev':" in message and "base --model" in message
    assert "variant 'odd':" in message and "config.json" in message
    assert "variant 'Bad Name':" in message


def test_built_values_need_their_base(base_config: dict) -> None:
    assert resolve_variants({"krea": "synthetic"}, model="synthetic:layers=1")["krea"].source == "built"
    with pytest.raises(WeightsError, match="needs --model tiny"):
        resolve_variants({"krea": "tiny"}, model="/w/dev", base_transformer_config=base_config)


def test_a_variant_of_another_family_is_refused(
    tiny_variants: Path, base_config: dict, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(tiny_variants / "krea", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "joint_attention_dim": 4096}))
    with pytest.raises(WeightsError, match="joint_attention_dim 4096 vs the base's 32"):
        resolve_variants({"krea": str(other)}, model="/w/dev", base_transformer_config=base_config)


def test_missing_weights_are_named(tiny_variants: Path, base_config: dict, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_variants / "krea", broken)
    (broken / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="transformer weights are missing"):
        resolve_variants({"krea": str(broken)}, model="/w/dev", base_transformer_config=base_config)
