"""What Triton needs at run time (a C compiler, Python's headers), found without torch; and the
GPU worker's reaction when it is missing: the compiled presets run eager, with the reason in
the log and in the preset's note, instead of the first compile killing the worker. The CUDA
calls of `detect_hardware("cuda")` are stood in (no GPU here)."""

from __future__ import annotations

import logging
import os
import stat
import sysconfig
from pathlib import Path

import pytest
import torch

from models.presets.apply import detect_hardware
from models.presets.policy import PRESETS, adapt_to_hardware
from models.toolchain import c_compiler, triton_build_missing


def executable(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def bare_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No compiler on PATH, no $CC, and a Python whose include folder has no Python.h."""
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delenv("CC", raising=False)
    include = tmp_path / "include"
    include.mkdir()
    paths = sysconfig.get_paths()
    monkeypatch.setattr(sysconfig, "get_paths", lambda *a, **k: {**paths, "include": str(include)})
    return tmp_path


def test_a_bare_machine_lacks_a_compiler_and_the_headers_and_says_how_to_get_them(bare_machine: Path) -> None:
    missing = triton_build_missing()
    assert len(missing) == 2
    assert missing[0] == "a C compiler (no gcc or clang on PATH; e.g. apt-get install gcc)"
    assert f"{bare_machine / 'include' / 'Python.h'} not found" in missing[1]
    assert "apt-get install python3-dev" in missing[1]


def test_the_compiler_is_found_as_triton_finds_it(
    bare_machine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clang = executable(bare_machine / "bin", "clang")
    assert c_compiler() == str(clang)
    gcc = executable(bare_machine / "bin", "gcc")
    assert c_compiler() == str(gcc)  # gcc first, as Triton does
    monkeypatch.setenv("CC", "cc-that-is-not-there")
    assert c_compiler() is None  # $CC wins, and a wrong one is reported as such
    assert "$CC=cc-that-is-not-there is not on PATH" in triton_build_missing()[0]
    (bare_machine / "include" / "Python.h").write_text("")
    monkeypatch.setenv("CC", str(gcc))
    assert triton_build_missing() == []


def stand_in_for_an_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.utils._triton

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)


def test_without_a_compiler_a_gpu_runs_the_compiled_presets_eager_and_says_why(
    bare_machine: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stand_in_for_an_h100(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="models.presets.apply"):
        hardware = detect_hardware("cuda")
    assert hardware.device_type == "cuda" and hardware.cuda_capability == (9, 0)
    assert hardware.compiler is False
    assert "compiled presets run eager: Triton cannot build kernels: a C compiler" in caplog.text
    assert "Python's headers" in caplog.text
    regular, note = adapt_to_hardware(PRESETS["regular"], hardware)
    assert regular.compile == "none" and regular.precision == "fp8"  # fp8 kept, compile dropped
    assert note is not None and "ran eager" in note


def test_with_the_toolchain_a_gpu_compiles(bare_machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in_for_an_h100(monkeypatch)
    monkeypatch.setenv("CC", str(executable(bare_machine / "bin", "gcc")))
    (bare_machine / "include" / "Python.h").write_text("")
    hardware = detect_hardware("cuda")
    assert hardware.compiler is True
    regular, note = adapt_to_hardware(PRESETS["regular"], hardware)
    assert regular.compile == "regional" and note is None
    assert os.environ["CC"].endswith("gcc") and torch.cuda.get_device_capability() == (9, 0)
