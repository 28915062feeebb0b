"""scripts/bench_gpu.py: its arithmetic, and its CPU mode run end to end as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import bench_gpu  # noqa: E402

from models.presets.apply import detect_hardware  # noqa: E402
from models.weights.synthetic import SyntheticSpec  # noqa: E402


def test_flops_match_the_published_count() -> None:
    full = SimpleNamespace(**SyntheticSpec().transformer_config())
    per_image = bench_gpu.flops_per_image(full, 1024, 1024, 28)
    assert abs(per_image / 2.08e15 - 1) < 0.01  # 74.4 TFLOP per step (performance-anchors §6)
    assert abs(bench_gpu.flops_per_image(full, 512, 512, 1) / 21.5e12 - 1) < 0.02


def test_tiny_mode_runs_and_writes_its_report(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "bench.json"
    data_dir = tmp_path / "data"  # finds the session's tiny model; the compile cache goes here
    data_dir.mkdir()
    (data_dir / tiny_model_dir.name).symlink_to(tiny_model_dir, target_is_directory=True)
    command = [
        sys.executable,
        str(REPO / "scripts" / "bench_gpu.py"),
        "--tiny",
        "--runs=1",
        "--steps=2",
        "--compile-backend=eager",  # the inductor compile is tested in tests/models/test_presets.py
        # Two rows: two pieces that cannot run on a CPU and one that can; one that cannot.
        "--tuning=cuda-graphs+fa3+compiled-vae,fa3",
        f"--data-dir={data_dir}",
        f"--out={out}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    table = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| mode | ran | s/image")
    modes = [line.split("|")[1].strip() for line in table[1:6]]
    tuned = "regular + CUDA graphs + FlashAttention-3 + compiled VAE decode"
    assert modes == ["diffusers eager (baseline)", "preset regular", "preset high", "preset none", tuned]
    tuning_table = table[table.index(next(line for line in table if line.startswith("| on top of"))) :]
    assert [cell.strip() for cell in tuning_table[1].split("|")[1:3]] == [
        tuned,
        "no (CUDA graphs, FlashAttention-3: see its note)",
    ]
    fa3_cells = [cell.strip() for cell in tuning_table[2].split("|")[1:3]]
    assert fa3_cells[0] == "regular + FlashAttention-3"
    assert fa3_cells[1].startswith("skipped: none of its pieces can run here: ")

    report = json.loads(out.read_text())
    assert report["size"] == "64x64" and report["steps"] == 2 and report["memory_plan"] == "resident"
    assert report["device"].startswith("CPU") and report["floor_s"] > 0
    baseline, regular, high, none, tuned_row, fa3_row = report["rows"]  # most important first
    assert baseline["ran"] == "plain FluxPipeline, float32"  # no bf16 on a CPU
    assert baseline["vs_baseline"] == 1.0 and baseline["rel_error"] == 0.0
    assert none["rel_error"] < 1e-6  # the `none` preset is plain diffusers
    assert "compute capability 8.9+" in regular["note"]
    if detect_hardware("cpu").int8_matmul:  # the fp8 fallback: int8 where the CPU has int8 units
        assert "int8 dynamic" in regular["ran"] and 0 < regular["rel_error"] < 0.5
    else:  # AVX2 only: the loaded precision, said so
        assert "weights as loaded" in regular["ran"] and "which this CPU lacks" in regular["note"]
        assert regular["rel_error"] < 1e-3
    # `high` at the stated fixed skip schedule: MagCache with FLUX.1 [dev]'s ratios, timed as is.
    assert "MagCache" in high["ran"] and "fixed skip schedule" in high["note"]
    assert high["vs_baseline"] > 0 and high["vs_floor"] > 0
    assert all(row["seconds"] > 0 and row["peak_gib"] is None for row in report["rows"][:5])
    # Block bodies are counted in --tiny mode, compiled presets included (the hooks go in first).
    assert baseline["block_work"] == none["block_work"] == regular["block_work"] == 1.0
    # What torch.compile did, per row (the eager baseline compiles nothing).
    assert baseline["graphs"] == 0 and baseline["graph_breaks"] == 0
    assert regular["graphs"] >= 1 and "graph_break_reasons" in regular
    assert report["versions"]["peft"] and report["runs_of_the_script"] == 1

    # The tuning row, after the memory plans: `regular` plus the pieces, beside `regular`.
    assert tuned_row["tuning_ran"] == ["compiled VAE decode"]  # the one of the three a CPU runs
    assert tuned_row["graphs"] == regular["graphs"] + 1  # the same blocks, and the VAE decoder
    assert "CUDA graphs need a CUDA device (this device: CPU)" in tuned_row["note"]
    assert "FlashAttention-3 needs a Hopper GPU" in tuned_row["note"]
    assert tuned_row["ran"] == regular["ran"] + ", compiled VAE decode"  # regular as it ran here, plus
    assert abs(tuned_row["rel_error"] - regular["rel_error"]) < 1e-4  # the VAE decode leaves latents alone
    # A row none of whose pieces can run here is not timed (it would be `regular` again).
    assert "seconds" not in fa3_row and "FlashAttention-3 needs a Hopper GPU" in fa3_row["skipped"]
    assert tuned_row["vs_regular"] == tuned_row["seconds"] / regular["seconds"]
