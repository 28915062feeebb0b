"""docs/configuration.md lists every setting."""

from __future__ import annotations

from pathlib import Path

from server.config import Settings

REPO = Path(__file__).resolve().parents[1]


def test_configuration_doc_lists_every_setting() -> None:
    doc = (REPO / "docs" / "configuration.md").read_text()
    missing = [name for name in Settings.model_fields if f"`FLUX_{name.upper()}`" not in doc]
    assert not missing, missing
