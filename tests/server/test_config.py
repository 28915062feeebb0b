"""Settings reach child processes intact: `serve` hands them over as FLUX_* variables."""

from __future__ import annotations

import pytest

from server.config import Settings


@pytest.fixture(autouse=True)
def no_flux_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FLUX_"):
            monkeypatch.delenv(name)


def test_every_setting_survives_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    lists = {name for name, field in Settings.model_fields.items() if "list" in str(field.annotation)}
    assert {"api_key", "fetch_allow", "fetch_deny", "trusted_proxy", "cors_origin"} <= lists
    for values in ({}, {name: ["a.lan", "10.0.0.0/8"] for name in lists - {"trusted_proxy"}}):
        settings = Settings(**values, metrics_key="m", max_prompt_length=10)
        for name, value in settings.to_env().items():
            monkeypatch.setenv(name, value)
        assert Settings() == settings
