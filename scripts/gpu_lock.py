"""constraints/gpu.txt, the one set of versions for a GPU install: read it, and check an
environment against it.

    python3 scripts/gpu_lock.py check [--json FILE]   # this interpreter's packages vs the lock
    python3 scripts/gpu_lock.py carried               # names==versions to carry as wheels
    python3 scripts/gpu_lock.py device                # names==versions the device already has
    python3 scripts/gpu_lock.py get NAME              # one pinned version (e.g. torch)
    python3 scripts/gpu_lock.py python                # the Python version it is for (3.12)

`check` is what scripts/gpu_proof.sh runs before measuring: a carried package missing or at
another version (a stale .whl/), or a peft too old for LoRA hot-swap, stops the proof with a
message that says what to do (exit 2); a device package at another version than the lock
(or absent, as triton on a CPU box) is only reported: the figures name the versions they
ran on. Imports nothing but the standard library (and models/versions.py, which imports
nothing more), so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LOCK = REPO / "constraints" / "gpu.txt"

from models.versions import hotswap_problem, installed_version, release  # noqa: E402

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s*#\s*(device|carried)\b")
_HEADER = re.compile(r"^#\s*(python|cuda)\s+(\d+\.\d+)\s*$")


@dataclass(frozen=True)
class Pin:
    name: str  # normalised (PEP 503): lower case, '-' for '_' and '.'
    version: str
    where: str  # "device": installed on the lent device machine; "carried": a wheel we bring


@dataclass(frozen=True)
class Lock:
    pins: dict[str, Pin]
    python: str
    cuda: str

    def version(self, name: str) -> str:
        return self.pins[normalise(name)].version

    def names(self, where: str) -> list[str]:
        return [f"{p.name}=={p.version}" for p in self.pins.values() if p.where == where]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> Lock:
    """Every `name==version  # device|carried` line, and the `# python X.Y` / `# cuda X.Y` headers.
    Any other non-comment line is an error: the file must stay readable by this parser and pip."""
    pins: dict[str, Pin] = {}
    headers: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if header := _HEADER.match(line):
            headers[header[1]] = header[2]
            continue
        if not line or line.startswith("#"):
            continue
        pin = _PIN.match(line)
        if pin is None:
            raise ValueError(f"{path}:{number}: expected 'name==version  # device|carried', got {raw!r}")
        name = normalise(pin[1])
        if name in pins:
            raise ValueError(f"{path}:{number}: {name} is pinned twice")
        pins[name] = Pin(name, pin[2], pin[3])
    missing = {"python", "cuda"} - headers.keys()
    if missing:
        raise ValueError(f"{path}: no '# {' / # '.join(sorted(missing))} X.Y' header")
    return Lock(pins, headers["python"], headers["cuda"])


@dataclass
class Verdict:
    errors: list[str]  # the proof must not run on this environment
    notes: list[str]  # differences that are reported with the figures
    installed: dict[str, str | None]


def check(lock: Lock, installed_version: Callable[[str], str | None]) -> Verdict:
    """Compare an environment (`installed_version(name)`, None when absent) with the lock."""
    errors: list[str] = []
    notes: list[str] = []
    installed: dict[str, str | None] = {}
    for pin in lock.pins.values():
        found = installed_version(pin.name)
        installed[pin.name] = found
        if found is None and pin.where == "carried":
            errors.append(
                f"{pin.name} is not installed (the lock carries {pin.version}); "
                "run scripts/make_device_wheels.sh and carry .whl/"
            )
        elif found is None:  # the device image has it; a CPU box may not need it (triton)
            notes.append(f"{pin.name} is not installed here (the device has {pin.version})")
        elif release(found) != release(pin.version) or (pin.where == "carried" and found != pin.version):
            if pin.where == "carried":
                errors.append(
                    f"{pin.name} {found} is installed but the lock carries {pin.version}: "
                    "the wheels in .whl/ are stale; run scripts/make_device_wheels.sh again"
                )
            else:
                notes.append(f"{pin.name} {found} on this machine, the lock says {pin.version}")
    peft = installed.get("peft")
    if peft is not None and (problem := hotswap_problem(peft)):
        errors.append(f"{problem}: carry peft=={lock.version('peft')} (scripts/make_device_wheels.sh)")
    return Verdict(errors, notes, installed)


def main(argv: list[str] | None = None, lock_path: Path = LOCK) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["check", "carried", "device", "get", "python", "cuda"])
    parser.add_argument("name", nargs="?", help="with `get`: the package")
    parser.add_argument("--json", type=Path, help="with `check`: also write the verdict here")
    args = parser.parse_args(argv)
    lock = read_lock(lock_path)
    if args.what in ("carried", "device"):
        print("\n".join(lock.names(args.what)))
    elif args.what == "get":
        if not args.name or normalise(args.name) not in lock.pins:
            parser.error(f"`get` needs a package the lock pins ({', '.join(lock.pins)})")
        print(lock.version(args.name))
    elif args.what in ("python", "cuda"):
        print(getattr(lock, args.what))
    else:
        verdict = check(lock, installed_version)
        python = ".".join(map(str, sys.version_info[:2]))
        if python != lock.python:
            verdict.notes.append(f"Python {python} here, the lock is for {lock.python}")
        for note in verdict.notes:
            print(f"gpu_lock: differs: {note}", file=sys.stderr)
        for error in verdict.errors:
            print(f"gpu_lock: ERROR: {error}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps(verdict.__dict__, indent=2) + "\n")
        if not verdict.errors:
            print(
                f"gpu_lock: {len(lock.pins)} packages as constraints/gpu.txt pins them"
                + (f" ({len(verdict.notes)} difference(s) noted)" if verdict.notes else "")
            )
        return 2 if verdict.errors else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
