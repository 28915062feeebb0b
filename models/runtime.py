"""FluxRuntime: FLUX.1 [dev] components loaded once, shared by every task.

CONTRACT (filled in by the models work; the worker and the CLI depend only on this):

    runtime = FluxRuntime.load(spec, device="cpu"|"cuda", safety_checker=Path|None,
                               presets=("none", "regular", "high"), memory_plan="auto",
                               data_dir=Path)
    out: Generation = runtime.generate(job, on_step=lambda i, n: ..., should_cancel=lambda: False)

`job` is a `server.jobs.Job`. `on_step(i, n)` is called after every denoising step (i from 1
to n); `should_cancel()` is checked at every step and a cancelled job returns with
`cancelled=True` and no images, without running the VAE decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class Generation:
    images: list[Image.Image]
    seed: int
    has_nsfw_concepts: list[bool]
    nsfw_checked: bool
    timings: dict[str, float] = field(default_factory=dict)
    preset: str = "none"
    preset_note: str | None = None
    cancelled: bool = False
