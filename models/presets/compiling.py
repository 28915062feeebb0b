"""torch.compile as the presets use it: compiling a module's forward, telling a compile failure
from any other error, and counting what dynamo compiled (for tests, logs and metrics).

    forward = compile_forward(block.forward, backend="inductor")
    before = CompileStats.now()
    ...                                      # calls that may compile
    spent = CompileStats.now() - before      # .graphs (graphs compiled), .seconds, .graph_breaks

The counts are dynamo's own, process-wide (`torch._dynamo.utils.counters` and
`compilation_time_metrics`): a difference over a span counts every compile in that span, so
hold the runtime's lock around it (one generation at a time does).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

# dynamo's timer around one frame's whole compile (tracing, the backend, guards).
_FRAME_COMPILE_TIMER = "_compile.compile_inner"


@dataclass(frozen=True)
class CompileStats:
    graphs: int = 0  # graphs dynamo handed to a backend
    seconds: float = 0.0  # wall time spent compiling frames
    graph_breaks: int = 0  # graph breaks dynamo recorded (each distinct reason counts once per frame)

    @staticmethod
    def now() -> CompileStats:
        """The process's totals so far (zero before anything compiled; without importing torch
        when nothing has imported dynamo yet)."""
        import sys

        if "torch._dynamo" not in sys.modules:
            return CompileStats()
        from torch._dynamo.utils import compilation_time_metrics, counters

        return CompileStats(
            graphs=int(counters["stats"]["unique_graphs"]),
            seconds=float(sum(compilation_time_metrics.get(_FRAME_COMPILE_TIMER, []))),
            graph_breaks=int(sum(counters["graph_break"].values())),
        )

    def __sub__(self, other: CompileStats) -> CompileStats:
        return CompileStats(
            self.graphs - other.graphs,
            max(0.0, self.seconds - other.seconds),
            self.graph_breaks - other.graph_breaks,
        )


def compile_forward(
    forward: Any, backend: Any, *, dynamic: bool = True, options: dict[str, Any] | None = None
) -> Any:
    """torch.compile with dynamic shapes and without duck sizing.

    Duck sizing gives equal sizes one symbol: at 1024x768 FLUX has 3072 image tokens, the same
    as its hidden size, so a warm-up there would specialise and 1024x1024 would recompile.
    (The tiny model: 16 image tokens at 64x64 = its head dim.)

    `dynamic=False`: a graph per shape (static shapes). `options`: inductor's config for this
    compile only (torch applies them around each of its compiles and restores the rest);
    ignored by any other backend."""
    import torch
    import torch.fx.experimental._config as fx_config

    if options and backend == "inductor":
        compiled = torch.compile(forward, dynamic=dynamic, backend=backend, options=options)
    else:
        compiled = torch.compile(forward, dynamic=dynamic, backend=backend)

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args, **kwargs)

    return call


def is_compile_failure(exc: BaseException) -> bool:
    """An error raised by torch.compile itself (dynamo tracing, the backend, inductor's C++ or
    Triton build), as opposed to one the model raised while computing. A compile failure is
    the preset's problem: the request can run again eagerly."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return False
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def failure_summary(exc: BaseException) -> str:
    """An error as one short line for a response note: its type and its message's first line
    (torch's compile errors run to pages; the log has them whole)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else "no message"
    return f"{type(exc).__name__}: {line if len(line) <= 200 else line[:197] + '...'}"
