"""What the installed libraries can do, read from their metadata (no import, no torch).

LoRA hot-swap (diffusers' `enable_lora_hotswap`, models/lora/hotswap.py) needs peft 0.17 or
newer; the GPU image pins a newer one (constraints/gpu.txt), but a machine set up by hand (or
the lent device machine, whose peft version is unknown) may hold an older one. The worker
checks at load, before it creates any slot, and says so in one clear line.
"""

from __future__ import annotations

import re
from importlib import metadata

PEFT_HOTSWAP_MIN = (0, 17)


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: '2.11.0+cu130' -> (2, 11, 0), '0.17.0rc1' -> (0, 17, 0)."""
    numbers = []
    for part in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits[0]))
    return tuple(numbers)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def hotswap_problem(peft_version: str | None = None) -> str | None:
    """Why LoRA hot-swap cannot run with this peft (`peft_version`, default: the installed
    one), or None when it can."""
    found = peft_version if peft_version is not None else installed_version("peft")
    needed = ".".join(map(str, PEFT_HOTSWAP_MIN))
    if found is None:
        return f"LoRA hot-swap needs peft >= {needed}, and peft is not installed"
    if release(found) < PEFT_HOTSWAP_MIN:
        return f"LoRA hot-swap needs peft >= {needed}, and peft {found} is installed"
    return None
