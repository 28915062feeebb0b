"""scripts/bench_gpu.py's report, written after every row so that nothing measured is lost.

A row is one measurement (the baseline, a preset, a memory plan). Before a row starts, its
name is written as `running`; when it ends, its figures (or its error) replace the marker. So:

- a row that raises is recorded with its error, and the next row runs (`measure` below);
- a process that dies inside a row (a sticky CUDA error, a segfault, the proof's time limit)
  leaves `running` behind; run again with `--resume` and that row is recorded as failed
  ("the process ended while measuring it"), the rows already done are kept and skipped, and
  the rest run. Every resume costs at least one row, so a loop of resumes ends.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SECTIONS = ("rows", "memory_plans")


class BenchReport:
    def __init__(self, path: Path | None, header: dict[str, Any], *, resume: bool = False) -> None:
        self.path = path
        self.started = time.perf_counter()
        previous: dict[str, Any] = {}
        if resume and path is not None and path.exists():
            previous = json.loads(path.read_text())
        self.before_s = float(previous.get("total_s", 0.0))  # earlier runs of a resumed report
        self.data: dict[str, Any] = {**previous, **header}
        for section in SECTIONS:
            self.data.setdefault(section, [])
        self.data.setdefault("runs_of_the_script", 0)
        self.data["runs_of_the_script"] += 1
        died_in = self.data.pop("running", None)
        if died_in is not None:
            section, name = died_in
            self.data[section].append(
                {
                    _key(section): name,
                    "error": "the process ended while measuring this row (a crash, or the time "
                    "limit; see bench.log)",
                }
            )
        self.save()

    def done(self, section: str, name: str) -> bool:
        return any(row.get(_key(section)) == name for row in self.data[section])

    def find(self, section: str, name: str) -> dict[str, Any] | None:
        return next((row for row in self.data[section] if row.get(_key(section)) == name), None)

    def measure(self, section: str, name: str, action: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one row: marked as running, then recorded with its figures or its error."""
        if self.done(section, name):
            return self.find(section, name) or {}
        self.data["running"] = [section, name]
        self.save()
        try:
            row = {_key(section): name, **action()}
        except Exception as exc:  # one row's failure (fp8, compile, OOM) costs only that row
            row = {_key(section): name, "error": f"{type(exc).__name__}: {exc}"}
            row["traceback"] = traceback.format_exc(limit=8)
            print(f"bench: {name} failed: {row['error']}", flush=True)
        self.data.pop("running", None)
        self.data[section].append(row)
        self.save()
        return row

    def skip(self, section: str, name: str, why: str) -> None:
        if not self.done(section, name):
            self.data[section].append({_key(section): name, "skipped": why})
            self.save()

    def save(self) -> None:
        self.data["total_s"] = self.before_s + time.perf_counter() - self.started
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
            temporary.replace(self.path)  # a reader (or a kill) never sees half a file


def _key(section: str) -> str:
    return "mode" if section == "rows" else "plan"
