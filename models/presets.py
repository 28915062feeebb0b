"""Acceleration presets (none / regular / high) as frozen dataclasses.

CONTRACT used by models/runtime.py (the full implementation is issue 5's work):

    manager = PresetManager(transformer, device=..., enabled=["none", "regular", "high"],
                            data_dir=...)
    with manager.use(pipe, requested="regular") as active:
        pipe(...)              # runs with the chosen transformer variant and step cache
    active.name                # the preset that actually ran
    active.note                # why it differs from the requested one, or None

This placeholder runs every request with the base transformer and reports that honestly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ActivePreset:
    name: str
    note: str | None


class PresetManager:
    def __init__(self, transformer: Any, *, device: str, enabled: list[str], data_dir: Any) -> None:
        self.transformer = transformer

    @contextmanager
    def use(self, pipe: Any, requested: str) -> Iterator[ActivePreset]:
        note = None if requested == "none" else f"preset {requested!r} is not available; ran 'none'"
        yield ActivePreset(name="none", note=note)
