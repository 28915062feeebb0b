"""peft's version for LoRA hot-swap (>= 0.17), read from its metadata, and the worker's load
path when it is too old: one clear warning and hot-swap off (LoRA requests run eager),
instead of a failure inside diffusers' enable_lora_hotswap at the first compiled LoRA request."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from models import versions
from models.loading import load_runtime
from tests.server.worker.support import make_data_dir


def test_peft_versions_for_hot_swap() -> None:
    assert (
        versions.hotswap_problem("0.15.2") == "LoRA hot-swap needs peft >= 0.17, and peft 0.15.2 is installed"
    )
    assert versions.hotswap_problem("0.16.9") is not None
    assert versions.hotswap_problem("0.17.0") is None
    assert versions.hotswap_problem("0.21.2+local") is None
    assert versions.release("2.11.0+cu130") == (2, 11, 0) and versions.release("0.17.0rc1") == (0, 17, 0)


def test_a_missing_peft_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(versions, "installed_version", lambda name: None)
    assert versions.hotswap_problem() == "LoRA hot-swap needs peft >= 0.17, and peft is not installed"


def test_an_old_peft_turns_hot_swap_off_with_one_clear_line(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = make_data_dir(tmp_path / "data", tiny_model_dir)
    real = versions.installed_version
    monkeypatch.setattr(
        versions, "installed_version", lambda name: "0.15.2" if name == "peft" else real(name)
    )
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        runtime = load_runtime("tiny", data_dir=data_dir, device="cpu", presets=("none", "regular"))
    assert runtime.presets.runnable["regular"][0].compile == "regional"  # a compiled preset is on
    assert runtime.loras.hotswap is False and runtime.loras.mode == "adapters"
    assert (
        "LoRA hot-swap needs peft >= 0.17, and peft 0.15.2 is installed: LoRA hot-swap is off" in caplog.text
    )

    monkeypatch.setattr(versions, "installed_version", real)  # the installed peft (>= 0.17)
    runtime = load_runtime("tiny", data_dir=data_dir, device="cpu", presets=("none", "regular"))
    assert runtime.loras.hotswap  # lazy slots, made at the first LoRA request
