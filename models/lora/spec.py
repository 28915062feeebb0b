"""What a request asks for (torch-free): local LoRA files with their scales, and the limits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.lora.errors import LoraError

DEFAULT_MAX_RANK = 128
# Hot-swap slots' rank: published FLUX LoRAs are mostly rank 4-64 (ai-toolkit and kohya
# defaults 16-32); a higher-rank LoRA still runs, on the slower eager path.
DEFAULT_HOTSWAP_RANK = 64
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3
DEFAULT_MAX_LOADED = 8
DEFAULT_MAX_PER_REQUEST = 3
MAX_ABS_SCALE = 8.0


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a request. `name` is what the client wrote (a URL, a path, a repo id), kept
    for messages; `file` is the local safetensors file the server resolved it to."""

    name: str
    file: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and abs(self.scale) <= MAX_ABS_SCALE):
            raise LoraError(self.name, f"scale must be between -{MAX_ABS_SCALE:g} and {MAX_ABS_SCALE:g}")


@dataclass(frozen=True)
class LoraLimits:
    """What LoRAs a runtime takes, and how it holds them on compiled presets.

    `max_rank`: the highest rank accepted. `hotswap`: when hot-swap slots are made on a server
    with a compiled preset: "lazy" (at the first LoRA request, on the layers LoRAs adapt),
    "eager" (at load, on every linear layer) or "off" (no slots: LoRA requests run eager).
    `hotswap_rank`: the slots' rank (every slotted LoRA is zero-padded to it; a LoRA of a
    higher rank runs eager)."""

    max_rank: int = DEFAULT_MAX_RANK
    hotswap: Literal["off", "lazy", "eager"] = "lazy"
    hotswap_rank: int = DEFAULT_HOTSWAP_RANK
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_loaded: int = DEFAULT_MAX_LOADED  # adapters kept in memory (least recently used goes first)
    max_per_request: int = DEFAULT_MAX_PER_REQUEST


def file_key(spec: LoraSpec) -> tuple[str, int, int]:
    """The identity of a LoRA file for the in-memory caches: path, size and modification time,
    so a file replaced in place is read again."""
    try:
        stat = spec.file.stat()
    except OSError as exc:
        raise LoraError(spec.name, f"the file cannot be read ({exc.strerror or exc})") from exc
    return (str(spec.file.resolve()), stat.st_size, stat.st_mtime_ns)
