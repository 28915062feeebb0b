"""What Triton needs to build its kernels at run time, found without importing torch.

torch.compile's inductor writes Triton kernels on a GPU, and Triton compiles a small C
launcher for each with the machine's C compiler against Python's headers. Without them the
first compiled call fails minutes into a worker's warm-up. So the supervisor says at start
what is missing (server/supervisor/preflight.py: check_toolchain) and the worker runs the
compiled presets eager instead (models/presets/apply.py: detect_hardware).

Triton's own search (triton/runtime/build.py): $CC, else `gcc`, else `clang` on PATH; the
headers from `sysconfig.get_paths()["include"]`.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path


def c_compiler() -> str | None:
    """The C compiler Triton would use, or None."""
    named = os.environ.get("CC")
    if named:
        return shutil.which(named)
    return shutil.which("gcc") or shutil.which("clang")


def python_headers() -> Path:
    """Where Triton looks for Python.h."""
    return Path(sysconfig.get_paths()["include"]) / "Python.h"


def triton_build_missing() -> list[str]:
    """What Triton lacks to build kernels here, each with how to install it; empty when nothing."""
    missing = []
    if c_compiler() is None:
        named = os.environ.get("CC")
        where = f"$CC={named} is not on PATH" if named else "no gcc or clang on PATH"
        missing.append(f"a C compiler ({where}; e.g. apt-get install gcc)")
    headers = python_headers()
    if not headers.is_file():
        missing.append(f"Python's headers ({headers} not found; e.g. apt-get install python3-dev)")
    return missing
