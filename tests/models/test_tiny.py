"""The tiny model: reproducible bytes, safe concurrent builds, usable tokenizers and parts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.tiny import TINY_DIRNAME, build_tiny_safety_checker

REPO = Path(__file__).resolve().parents[2]


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_concurrent_builds_are_safe_and_byte_identical(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Two processes rebuild an outdated folder at once; the result equals the shared build."""
    stale = tmp_path / TINY_DIRNAME
    shutil.copytree(tiny_model_dir, stale)
    (stale / "tiny-build.json").write_text(json.dumps({"version": "0"}))
    (stale / "leftover.txt").write_text("from an old build")
    code = (
        "import sys; from pathlib import Path; from models.tiny import ensure_tiny; "
        "print(ensure_tiny(Path(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == [str(stale)] * 2
    assert [p.name for p in tmp_path.iterdir()] == [TINY_DIRNAME]  # no build leftovers
    built, shared = file_bytes(stale), file_bytes(tiny_model_dir)
    assert "leftover.txt" not in built
    assert built.keys() == shared.keys()
    assert [name for name in built if built[name] != shared[name]] == []
    assert sum(len(b) for b in built.values()) < 2_000_000


def test_folder_layout(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    transformer = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    assert transformer["guidance_embeds"] is True
    scheduler = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["use_dynamic_shifting"] is True
    assert (scheduler["base_shift"], scheduler["max_shift"]) == (0.5, 1.15)
    for part in ("image_encoder", "feature_extractor", "image_embedder"):
        assert (tiny_model_dir / "redux" / part).is_dir()
    assert not list(tiny_model_dir.rglob("*.bin")), "weights must be safetensors"


def test_plain_diffusers_loads_and_runs_it(tiny_model_dir: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_model_dir, local_files_only=True)

    def run() -> bytes:
        generator = torch.Generator().manual_seed(7)
        out = pipe("a cat", height=32, width=64, num_inference_steps=2, generator=generator)
        return out.images[0].tobytes()

    first = run()
    assert len(first) == 32 * 64 * 3
    assert run() == first


def test_tokenizers_never_produce_unknown_tokens(tiny_model_dir: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config, T5Tokenizer

    clip = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    t5 = T5Tokenizer.from_pretrained(tiny_model_dir / "tokenizer_2")
    clip_config = CLIPTextConfig.from_pretrained(tiny_model_dir / "text_encoder")
    t5_config = T5Config.from_pretrained(tiny_model_dir / "text_encoder_2")

    assert len(clip) == clip_config.vocab_size
    assert clip.eos_token_id == clip_config.eos_token_id  # CLIP pooling looks for this id
    assert len(t5) <= t5_config.vocab_size
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)

    text = "A photo of a Zebra, 42 kilograms; naïve café — 東京 🎨!"
    clip_ids = clip(text).input_ids
    assert clip_ids[0] == clip.bos_token_id and clip_ids[-1] == clip.eos_token_id
    # CLIP's unknown token is its end-of-text token: it must only appear at the end.
    assert clip.unk_token == clip.eos_token
    assert clip.eos_token_id not in clip_ids[1:-1]
    ascii_text = "A photo of a Zebra, 42 kilograms; [weird] ~tokens~ #1!"
    assert t5.unk_token_id not in t5(ascii_text).input_ids
    assert t5.decode(t5(ascii_text).input_ids, skip_special_tokens=True) == ascii_text

    long_prompt = "a very long prompt " * 200
    assert len(clip(long_prompt, truncation=True, max_length=77).input_ids) == 77
    padded = t5(long_prompt, padding="max_length", truncation=True, max_length=512).input_ids
    assert len(padded) == 512


@pytest.mark.parametrize(("flag", "label"), [(True, "nsfw"), (False, "normal")])
def test_safety_checker_fixture(tmp_path: Path, flag: bool, label: str) -> None:
    from transformers import pipeline

    path = build_tiny_safety_checker(tmp_path / "checker", flag=flag)
    classify = pipeline("image-classification", model=str(path))
    images = [Image.new("RGB", (64, 48), (0, 0, 0)), Image.new("RGB", (20, 90), (250, 200, 10))]
    for result in classify(images):
        assert result[0]["label"] == label
        assert result[0]["score"] > 0.99
    again = build_tiny_safety_checker(tmp_path / "again", flag=flag)
    assert file_bytes(path) == file_bytes(again)
