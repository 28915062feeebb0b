"""`flux-server generate` on the tiny model: one real subprocess, the rest through main()."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from server.supervisor.cli import main
from server.supervisor.generate import output_paths, parse_size

REPO = Path(__file__).resolve().parents[3]


def generate(tiny_model_dir: Path, out: Path, *extra: str) -> int:
    args = ["generate", "--model", "tiny", "--data-dir", str(tiny_model_dir.parent), "--device", "cpu"]
    return main([*args, "--prompt", "a red cat", "--out", str(out), "--steps", "2", *extra])


def test_subprocess_writes_the_requested_size_byte_identical_per_seed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sub.png"
    command = [sys.executable, "-m", "server.supervisor.cli", "generate", "--model", "tiny"]
    command += ["--data-dir", str(tiny_model_dir.parent), "--prompt", "a red cat", "--out", str(out)]
    command += ["--size", "100x70", "--steps", "2", "--seed", "11"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "seed: 11" in done.stdout
    assert f"wrote {out} (96x64)" in done.stdout
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (96, 64)
    # Same seed in another process (this one, through main()): the same bytes.
    again = tmp_path / "again.png"
    assert generate(tiny_model_dir, again, "--size", "96x64", "--seed", "11") == 0
    assert again.read_bytes() == out.read_bytes()


def test_same_seed_same_bytes_other_seed_differs(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
    for path, seed in zip(paths, ("3", "3", "4"), strict=True):
        assert generate(tiny_model_dir, path, "--size", "64x64", "--seed", seed) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes() != paths[2].read_bytes()


def test_seed_is_printed_when_drawn(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert generate(tiny_model_dir, tmp_path / "x.png", "--size", "64x64") == 0
    seed_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seed: ")]
    assert len(seed_lines) == 1 and int(seed_lines[0].removeprefix("seed: ")) >= 0


def test_num_images_writes_numbered_files(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "many.png"
    assert generate(tiny_model_dir, out, "--size", "64x64", "--num-images", "3", "--seed", "1") == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["many-1.png", "many-2.png", "many-3.png"]
    assert len({p.read_bytes() for p in tmp_path.iterdir()}) == 3
    stdout = capsys.readouterr().out
    assert all(f"wrote {tmp_path / name}" in stdout for name in written)


def test_image_to_image_follows_the_input_size(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (130, 90), (10, 200, 30)).save(source)
    out = tmp_path / "out.jpg"  # the extension picks the format
    code = generate(tiny_model_dir, out, "--image", str(source), "--strength", "0.6", "--seed", "2")
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (128, 96)


def test_webp_output(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.webp"
    assert generate(tiny_model_dir, out, "--size", "square", "--steps", "1") == 0
    with Image.open(out) as image:
        assert image.format == "WEBP" and image.size == (512, 512)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "huge"], "expected WxH"),
        (["--size", "10x10"], "outside 64..2048"),
        (["--size", "4096x4096"], "outside 64..2048"),
        (["--num-images", "5"], "--num-images must be between 1 and 4"),
        (["--steps", "0"], "num_inference_steps must be between 1 and 50"),
        (["--seed", "-1"], "--seed must be in"),
        (["--image", "/nonexistent/in.png"], "cannot read it as an image"),
        (["--image", "IMAGE", "--strength", "0"], "strength must be in (0, 1]"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    tiny_model_dir: Path, tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(source)
    args = [str(source) if a == "IMAGE" else a for a in args]
    assert generate(tiny_model_dir, tmp_path / "out.png", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out.png").exists()


def test_unknown_output_extension(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    assert generate(tiny_model_dir, tmp_path / "out.gif") == 2
    assert "the extension must be one of .png, .jpg, .jpeg, .webp" in capsys.readouterr().err


def test_broken_model_folder_fails_fast_naming_the_missing_part(tiny_model_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    command = [sys.executable, "-m", "server.supervisor.cli", "generate", "--model", str(broken)]
    command += ["--prompt", "x", "--out", str(tmp_path / "out.png")]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert done.returncode == 2
    assert f"the vae component is missing: expected the folder {broken / 'vae'}" in done.stderr
    assert elapsed < 10  # checked before torch is even imported (~0.5 s unloaded)
    assert not (tmp_path / "out.png").exists()


def test_parse_size_and_output_paths() -> None:
    assert parse_size("landscape_16_9") == (1024, 576)
    assert parse_size("100x70") == (96, 64)
    assert parse_size("512X512") == (512, 512)
    assert output_paths(Path("d/img.png"), 1) == [Path("d/img.png")]
    assert output_paths(Path("d/img.png"), 2) == [Path("d/img-1.png"), Path("d/img-2.png")]


def test_generate_on_a_synthetic_model_says_its_weights_are_random(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "noise.png"
    small = "synthetic:layers=1,single_layers=1,t5_layers=1,clip_layers=1,siglip_layers=1"
    args = ["generate", "--model", small, "--data-dir", str(tiny_model_dir.parent), "--device", "cpu"]
    assert main([*args, "--prompt", "a cat", "--out", str(out), "--steps", "1", "--size", "64x64"]) == 0
    printed = capsys.readouterr().out
    assert f"model: {small}; memory plan resident; random weights" in printed
    assert "no safety checker" in printed
    with Image.open(out) as image:
        assert image.size == (64, 64)
