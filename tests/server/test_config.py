"""Settings: what is derived from other settings, and what reaches child processes intact
(`serve` hands settings over as FLUX_* variables)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.config import Settings
from server.supervisor.cli import build_parser, settings_from_args


@pytest.fixture(autouse=True)
def no_flux_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLUX_"):
            monkeypatch.delenv(name)


def test_files_dir_follows_the_data_dir_unless_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).files_dir == tmp_path / "files"
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path)])
    assert settings_from_args(args).files_dir == tmp_path / "files"
    shared = tmp_path / "mount"
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--files-dir", str(shared)])
    assert settings_from_args(args).files_dir == shared
    monkeypatch.setenv("FLUX_FILES_DIR", str(shared))
    assert Settings(data_dir=tmp_path).files_dir == shared


def test_child_processes_get_the_same_files_dir_and_limits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    parent = Settings(data_dir=tmp_path, max_upload_bytes=1234)
    for name, value in parent.to_env().items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert (child.files_dir, child.max_upload_bytes) == (tmp_path / "files", 1234)
    assert child.default_acceleration is None  # unset: each path's documented default


def test_every_setting_survives_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    lists = {name for name, field in Settings.model_fields.items() if "list" in str(field.annotation)}
    assert {"api_key", "fetch_allow", "fetch_deny", "trusted_proxy", "cors_origin"} <= lists
    # Lists of free values get any two; preset_tuning takes only the pieces' names.
    free = {name: ["a.lan", "10.0.0.0/8"] for name in lists - {"trusted_proxy", "preset_tuning"}}
    for values in ({}, {**free, "preset_tuning": ["fa3", "cuda-graphs"]}):
        settings = Settings(**values, metrics_key="m", max_prompt_length=10)
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        assert Settings() == settings


def test_upload_limits_must_be_positive(tmp_path: Path) -> None:
    for bad in ({"max_upload_bytes": 0}, {"max_upload_retention_seconds": 0}):
        with pytest.raises(ValueError):
            Settings(data_dir=tmp_path, **bad)


def test_variants_from_flags_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.supervisor.cli import build_parser, settings_from_args

    args = ["serve", "--variant", "fill=/w/fill", "--variant", "my-style=/w/s.safetensors"]
    args += ["--worker-variants", "w0=dev,fill", "--worker-variants", "w1=my-style", "--pin-variants", "dev"]
    settings = settings_from_args(build_parser().parse_args(args))
    assert settings.variants == {"fill": "/w/fill", "my-style": "/w/s.safetensors"}
    assert settings.worker_variants == {"w0": ["dev", "fill"], "w1": ["my-style"]}
    assert settings.pin_variants == ["dev"]
    assert settings.variants_of_worker("box-a-w1") == ["my-style"]  # a shared queue's worker id
    assert settings.variants_of_worker("w2") is None  # not named: serves every variant
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == settings
    monkeypatch.setenv("FLUX_WORKER_VARIANTS", "dev,kontext")  # every worker of the box
    assert Settings().variants_of_worker("w5") == ["dev", "kontext"]
    with pytest.raises(ValueError, match="--variant takes NAME=PATH"):
        Settings(variants=["fill"])
