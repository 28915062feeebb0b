"""The NSFW checker and the runtime's black-out, with the tiny always/never-flag classifiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from models.loading import load_runtime
from models.request import GenerationRequest
from models.runtime import FluxRuntime
from models.safety import (
    DEFAULT_THRESHOLD,
    SafetyChecker,
    SafetyCheckerError,
    black_like,
    threshold_for_tolerance,
)
from models.tiny import build_tiny_safety_checker


@pytest.fixture(scope="module")
def always_flag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_safety_checker(tmp_path_factory.mktemp("safety") / "always", flag=True)


@pytest.fixture(scope="module")
def never_flag_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_safety_checker(tmp_path_factory.mktemp("safety") / "never", flag=False)


def runtime_with_checker(tiny_model_dir: Path, checker: Path | None) -> FluxRuntime:
    return load_runtime(
        "tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",), safety_checker=checker
    )


@pytest.fixture(scope="module")
def always_runtime(tiny_model_dir: Path, always_flag_dir: Path) -> FluxRuntime:
    return runtime_with_checker(tiny_model_dir, always_flag_dir)


@pytest.fixture(scope="module")
def never_runtime(tiny_model_dir: Path, never_flag_dir: Path) -> FluxRuntime:
    return runtime_with_checker(tiny_model_dir, never_flag_dir)


def job(**fields) -> GenerationRequest:
    return GenerationRequest(
        **{"width": 64, "height": 64, "prompt": "a cat", "steps": 2, "seed": 3, **fields}
    )


def is_black(image: Image.Image) -> bool:
    return image.mode == "RGB" and image.getextrema() == ((0, 0), (0, 0), (0, 0))


# --- thresholds -----------------------------------------------------------------------------


def test_tolerance_runs_from_strict_to_permissive() -> None:
    thresholds = [threshold_for_tolerance(t) for t in range(7)]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) == 7
    assert threshold_for_tolerance(None) == DEFAULT_THRESHOLD == 0.5
    assert threshold_for_tolerance(3) == DEFAULT_THRESHOLD


@pytest.mark.parametrize("tolerance", [-1, 7])
def test_tolerance_out_of_range_is_refused(tolerance: int) -> None:
    with pytest.raises(ValueError, match="safety_tolerance must be between 0 and 6"):
        threshold_for_tolerance(tolerance)


# --- the checker alone ----------------------------------------------------------------------


def test_checker_flags_by_the_nsfw_label(always_flag_dir: Path, never_flag_dir: Path) -> None:
    images = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("L", (40, 30), 128)]
    always, never = SafetyChecker(always_flag_dir), SafetyChecker(never_flag_dir)
    assert always.check(images) == [True, True]
    assert never.check(images) == [False, False]
    assert all(score > 0.99 for score in always.scores(images))
    assert all(score < 0.01 for score in never.scores(images))
    # The threshold decides: nothing reaches a threshold above 1, everything reaches 0.
    assert always.check(images, threshold=1.01) == [False, False]
    assert never.check(images, threshold=0.0) == [True, True]
    assert always.check([]) == []


def test_checker_folder_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(SafetyCheckerError, match=r"no config\.json"):
        SafetyChecker(tmp_path)


def test_checker_without_an_nsfw_label_is_refused(tmp_path: Path) -> None:
    folder = build_tiny_safety_checker(tmp_path / "pets", flag=True)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {"0": "cat", "1": "dog"}
    config["label2id"] = {"cat": 0, "dog": 1}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SafetyCheckerError, match=r"\['cat', 'dog'\] include none of"):
        SafetyChecker(folder)


def test_black_like_keeps_the_size() -> None:
    black = black_like(Image.new("RGB", (96, 64), (255, 255, 255)))
    assert black.size == (96, 64) and is_black(black)


# --- in the runtime ---------------------------------------------------------------------------


def test_flagged_images_are_blacked_out(always_runtime: FluxRuntime) -> None:
    assert always_runtime.safety_checker_configured
    out = always_runtime.generate(job(num_images=2, width=80))
    assert out.nsfw_checked is True
    assert out.has_nsfw_concepts == [True, True]
    assert [im.size for im in out.images] == [(80, 64), (80, 64)]
    assert all(is_black(im) for im in out.images)
    assert "safety" in out.timings


def test_most_permissive_tolerance_still_flags_a_certain_image(always_runtime: FluxRuntime) -> None:
    out = always_runtime.generate(job(safety_tolerance=6))
    assert out.has_nsfw_concepts == [True] and is_black(out.images[0])


def test_request_can_disable_the_checker(always_runtime: FluxRuntime) -> None:
    out = always_runtime.generate(job(enable_safety_checker=False))
    assert out.nsfw_checked is False
    assert out.has_nsfw_concepts == [False]
    assert not is_black(out.images[0])
    assert "safety" not in out.timings


def test_clean_images_are_kept_and_reported_checked(never_runtime: FluxRuntime) -> None:
    out = never_runtime.generate(job(task="redux", image=_png(64, 64)))
    assert out.nsfw_checked is True
    assert out.has_nsfw_concepts == [False]
    assert not is_black(out.images[0])


def test_flagging_does_not_change_unflagged_runs(
    always_runtime: FluxRuntime, never_runtime: FluxRuntime
) -> None:
    # Same weights and seed: the never-flag runtime returns exactly the unchecked image.
    unchecked = always_runtime.generate(job(enable_safety_checker=False))
    kept = never_runtime.generate(job())
    assert kept.images[0].tobytes() == unchecked.images[0].tobytes()


def test_a_broken_checker_fails_at_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SafetyCheckerError, match=str(tmp_path)):
        runtime_with_checker(tiny_model_dir, tmp_path)


def _png(width: int, height: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()
