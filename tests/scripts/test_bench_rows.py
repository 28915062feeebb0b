"""scripts/bench_rows.py and the proof's resume loop: a row that raises costs only its row, a
process that dies inside a row loses nothing measured before it, and a resumed run records
that row as failed and measures the rest. The deaths are real (`os._exit` in a child)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_proof  # noqa: E402
from bench_rows import BenchReport  # noqa: E402
from gpu_report import proof_table  # noqa: E402

# A stand-in for bench_gpu.py: the same report, rows that take no GPU; it dies inside the row
# named by the file `die-in` (once: the file is removed first), as a sticky CUDA error would.
FAKE_BENCH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {scripts!r})
    from bench_rows import BenchReport

    out = Path(next(a for a in sys.argv if a.startswith("--out=")).split("=", 1)[1])
    die_in = out.parent / "die-in"
    report = BenchReport(out, {{"device": "fake"}}, resume="--resume" in sys.argv)

    MODE = {{"ran": "fake", "warmup_s": 0.0, "peak_gib": None, "vs_baseline": None, "vs_floor": None,
            "block_work": None, "rel_error": None}}
    PLAN = {{"steps": 2, "resident_gib": None, "peak_gib": None, "expected_peak_gib": 34.0}}

    def row(name, figures):
        def measure():
            if die_in.exists() and die_in.read_text() == name:
                die_in.unlink()
                os._exit(139)
            return figures
        return measure

    for name, seconds in (("diffusers eager (baseline)", 6.0), ("preset regular", 2.0), ("preset high", 1.5)):
        report.measure("rows", name, row(name, {{**MODE, "seconds": seconds}}))
    report.measure("memory_plans", "resident", row("resident", {{**PLAN, "seconds": 7.0}}))
    """
).format(scripts=str(REPO / "scripts"))


def test_a_row_that_raises_costs_only_that_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    report = BenchReport(out, {"device": "cpu"})
    report.measure("rows", "diffusers eager (baseline)", lambda: {"seconds": 6.0})

    def fp8_fails() -> dict[str, Any]:
        raise RuntimeError("torchao: fp8 needs compute capability 8.9")

    report.measure("rows", "preset regular", fp8_fails)
    report.measure("rows", "preset high", lambda: {"seconds": 1.5})
    saved = json.loads(out.read_text())
    baseline, regular, high = saved["rows"]
    assert baseline == {"mode": "diffusers eager (baseline)", "seconds": 6.0}
    assert regular["error"] == "RuntimeError: torchao: fp8 needs compute capability 8.9"
    assert "fp8_fails" in regular["traceback"] and high["seconds"] == 1.5
    assert "running" not in saved


def test_a_death_inside_a_row_keeps_what_was_measured_and_a_resume_measures_the_rest(tmp_path: Path) -> None:
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE_BENCH)
    out = tmp_path / "bench.json"
    (tmp_path / "die-in").write_text("preset regular")
    first = subprocess.run([sys.executable, str(script), f"--out={out}"], timeout=60)
    assert first.returncode == 139
    died = json.loads(out.read_text())
    assert [row["mode"] for row in died["rows"]] == ["diffusers eager (baseline)"]  # kept
    assert died["running"] == ["rows", "preset regular"]

    second = subprocess.run([sys.executable, str(script), f"--out={out}", "--resume"], timeout=60)
    assert second.returncode == 0
    done = json.loads(out.read_text())
    modes = [(row["mode"], row.get("seconds"), "error" in row) for row in done["rows"]]
    assert modes == [
        ("diffusers eager (baseline)", 6.0, False),
        ("preset regular", None, True),  # the row it died in, as failed
        ("preset high", 1.5, False),
    ]
    assert "the process ended while measuring this row" in done["rows"][1]["error"]
    assert [(plan["plan"], plan["seconds"]) for plan in done["memory_plans"]] == [("resident", 7.0)]
    assert done["runs_of_the_script"] == 2 and "running" not in done


@pytest.mark.parametrize("die_in", ["preset high", "resident"])
def test_the_proof_resumes_the_bench_after_a_death_and_reports_the_lost_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, die_in: str
) -> None:
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE_BENCH)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "die-in").write_text(die_in)
    real_run = subprocess.run

    def run_the_fake(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        assert command[1].endswith("bench_gpu.py")  # the proof's own command, on the stand-in
        return real_run([command[0], str(script), *command[2:]], **kwargs)

    monkeypatch.setattr(gpu_proof.subprocess, "run", run_the_fake)
    args = gpu_proof.parse_args(["--cpu-smoke", f"--out={tmp_path / 'out'}", f"--data-dir={tmp_path}"])
    report = gpu_proof.run_bench(args)
    assert report["error"] == "bench_gpu.py exited with code 139 (see bench.log)"
    failed = [row for section in ("rows", "memory_plans") for row in report[section] if "error" in row]
    assert [row.get("mode", row.get("plan")) for row in failed] == [die_in]
    assert len(report["rows"]) == 3 and len(report["memory_plans"]) == 1
    table = proof_table({"bench": report})
    assert f"- bench {die_in}: FAILED: the process ended while measuring this row" in table


def test_a_run_stopped_at_the_limit_names_the_row_it_was_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def stopped(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        report = BenchReport(out / "bench.json", {"device": "fake"})
        report.measure("rows", "diffusers eager (baseline)", lambda: {"seconds": 6.0})
        report.data["running"] = ["rows", "preset regular"]  # where the kill found it
        report.save()
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(gpu_proof.subprocess, "run", stopped)
    args: argparse.Namespace = gpu_proof.parse_args(["--cpu-smoke", f"--out={out}", f"--data-dir={tmp_path}"])
    report = gpu_proof.run_bench(args)
    baseline, regular = report["rows"]
    assert baseline["seconds"] == 6.0
    assert (
        regular["error"] == "stopped inside this row: bench_gpu.py was stopped at the part's limit of 900 s"
    )
