"""scripts/fetch_weights.py without a network: arguments, destination rules, the folder check.

The download itself (huggingface_hub.snapshot_download) needs the Hub, so `main` takes the
downloader as a parameter; the tests pass one that copies files from the tiny model instead.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "fetch_weights.py"

_spec = importlib.util.spec_from_file_location("fetch_weights", SCRIPT)
assert _spec is not None and _spec.loader is not None
fetch_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetch_weights)

# The file list of black-forest-labs/FLUX.1-dev (main branch, diffusers layout + BFL files).
FLUX_DEV_FILES = [
    ".gitattributes",
    "LICENSE.md",
    "README.md",
    "ae.safetensors",
    "dev_grid.jpg",
    "flux1-dev.safetensors",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def selected(patterns: list[str]) -> set[str]:
    from huggingface_hub.utils import filter_repo_objects

    return set(filter_repo_objects(FLUX_DEV_FILES, allow_patterns=patterns))


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_help() -> None:
    result = run_script("--help")
    assert result.returncode == 0
    for flag in ("--dest", "--token", "--single-file", "--redux", "--check-only"):
        assert flag in result.stdout


def test_dest_is_required() -> None:
    result = run_script()
    assert result.returncode == 2
    assert "--dest" in result.stderr


def test_missing_token_explains_the_gate(tmp_path: Path) -> None:
    result = run_script("--dest", str(tmp_path / "flux"))
    assert result.returncode == 2
    assert "gated" in result.stderr
    assert "--token" in result.stderr and "HF_TOKEN" in result.stderr
    assert not (tmp_path / "flux").exists()


def test_patterns_fetch_exactly_what_the_runtime_loads() -> None:
    files = selected(fetch_weights.dev_patterns(single_file=False))
    expected = {
        f
        for f in FLUX_DEV_FILES
        if "/" in f and not f.startswith(".")  # every component file...
    } | {"model_index.json"}
    assert files == expected
    assert "flux1-dev.safetensors" not in files and "ae.safetensors" not in files


def test_single_file_patterns_skip_the_transformer_shards() -> None:
    files = selected(fetch_weights.dev_patterns(single_file=True))
    assert "flux1-dev.safetensors" in files
    assert "transformer/config.json" in files
    assert not any(f.startswith("transformer/diffusion_pytorch_model") for f in files)
    assert "ae.safetensors" not in files
    assert "vae/diffusion_pytorch_model.safetensors" in files


class CopyDownloader:
    """Stands in for snapshot_download: copies the allowed files of a local 'repository'."""

    def __init__(self, repo: Path, skip: tuple[str, ...] = ()) -> None:
        self.repo, self.skip, self.calls = repo, skip, []

    def __call__(self, *, repo_id: str, local_dir: Path, allow_patterns: list[str], token: str) -> str:
        self.calls.append({"repo_id": repo_id, "local_dir": local_dir, "token": token})
        for path in sorted(self.repo.rglob("*")):
            name = path.relative_to(self.repo).as_posix()
            if (
                path.is_file()
                and name not in self.skip
                and any(fnmatch.fnmatch(name, p) for p in allow_patterns)
            ):
                (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, local_dir / name)
        (local_dir / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        return str(local_dir)


def test_download_then_check_succeeds(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    downloader = CopyDownloader(tiny_model_dir)
    dest = tmp_path / "flux"
    assert fetch_weights.main(["--dest", str(dest), "--token", "hf_test"], download=downloader) == 0
    assert downloader.calls == [{"repo_id": fetch_weights.DEV_REPO, "local_dir": dest, "token": "hf_test"}]
    assert f"--model {dest}" in capsys.readouterr().out
    # A second run (resume) into the same folder is accepted.
    assert fetch_weights.main(["--dest", str(dest), "--token", "hf_test"], download=downloader) == 0


def test_token_from_environment(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    downloader = CopyDownloader(tiny_model_dir)
    assert fetch_weights.main(["--dest", str(tmp_path / "flux")], download=downloader) == 0
    assert downloader.calls[0]["token"] == "hf_from_env"


def test_check_reports_missing_files(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    downloader = CopyDownloader(tiny_model_dir, skip=("vae/diffusion_pytorch_model.safetensors",))
    dest = tmp_path / "flux"
    assert fetch_weights.main(["--dest", str(dest), "--token", "hf_test"], download=downloader) == 1
    err = capsys.readouterr().err
    assert "incomplete" in err and "vae weights are missing" in err and str(dest / "vae") in err


def test_check_only_on_a_broken_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    dest = Path(shutil.copytree(tiny_model_dir, tmp_path / "flux"))
    shutil.rmtree(dest / "tokenizer")
    result = run_script("--dest", str(dest), "--check-only")
    assert result.returncode == 1
    assert "tokenizer component is missing" in result.stderr and str(dest / "tokenizer") in result.stderr


def test_check_only_single_file_needs_the_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    dest = Path(shutil.copytree(tiny_model_dir, tmp_path / "flux"))
    result = run_script("--dest", str(dest), "--check-only", "--single-file")
    assert result.returncode == 1
    assert "flux1-dev.safetensors" in result.stderr


@pytest.mark.parametrize("case", ["file", "foreign-folder", "no-parent"])
def test_dest_validation(tmp_path: Path, tiny_model_dir: Path, case: str) -> None:
    dest = tmp_path / "dest"
    if case == "file":
        dest.write_text("not a folder")
        expected = "is not a folder"
    elif case == "foreign-folder":
        dest.mkdir()
        (dest / "holiday.txt").write_text("unrelated")
        expected = "is not empty"
    else:
        dest = tmp_path / "missing" / "dest"
        expected = "parent folder of --dest does not exist"
    downloader = CopyDownloader(tiny_model_dir)
    with pytest.raises(SystemExit, match=expected):
        fetch_weights.main(["--dest", str(dest), "--token", "hf_test"], download=downloader)
    assert downloader.calls == []


def test_a_variant_fetches_its_transformer_only(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from models.variants.tiny import ensure_tiny_variants

    repo = tmp_path / "FLUX.1-Fill-dev"  # the repository's layout: transformer/ and a pipeline index
    shutil.copytree(ensure_tiny_variants(tiny_model_dir.parent) / "fill", repo / "transformer")
    (repo / "model_index.json").write_text('{"_class_name": "FluxFillPipeline"}')
    shutil.copytree(tiny_model_dir / "vae", repo / "vae")  # present upstream, never fetched
    downloader = CopyDownloader(repo)
    dest = tmp_path / "fill"
    code = fetch_weights.main(["--variant", "fill", "--dest", str(dest), "--token", "t"], download=downloader)
    assert code == 0
    assert downloader.calls[0]["repo_id"] == "black-forest-labs/FLUX.1-Fill-dev"
    assert (dest / "transformer" / "config.json").is_file() and not (dest / "vae").exists()
    assert f"--variant fill={dest}" in capsys.readouterr().out
    assert fetch_weights.variant_patterns("krea", single_file=True) == ["flux1-krea-dev.safetensors"]


def test_a_variant_that_is_not_the_one_asked_for_fails_its_check(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from models.variants.tiny import ensure_tiny_variants

    dest = tmp_path / "kontext"
    shutil.copytree(ensure_tiny_variants(tiny_model_dir.parent) / "fill", dest / "transformer")
    assert fetch_weights.main(["--variant", "kontext", "--dest", str(dest), "--check-only"]) == 1
