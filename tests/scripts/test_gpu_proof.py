"""scripts/gpu_proof.py --cpu-smoke end to end: the bench on a small synthetic model, then
`flux-server serve --model synthetic:...` driven by the real fal_client, all on the CPU.

What the first GPU run executes is this same code at full size, so a typo, a wrong key or a
broken report fails here first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_proof  # noqa: E402
from gpu_report import proof_table  # noqa: E402

from models.loading import compute_dtype  # noqa: E402
from models.presets.apply import detect_hardware  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cpu_smoke_runs_both_parts_and_reports_every_figure(tmp_path: Path, tiny_model_dir: Path) -> None:
    data_dir, out = tmp_path / "data", tmp_path / "out"
    for part in ("bench", "serve"):  # the session's tiny model: tokenizers and scheduler only
        (data_dir / part).mkdir(parents=True)
        (data_dir / part / tiny_model_dir.name).symlink_to(tiny_model_dir, target_is_directory=True)
    command = [sys.executable, str(REPO / "scripts" / "gpu_proof.py"), "--cpu-smoke"]
    command += [f"--out={out}", f"--data-dir={data_dir}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1400)
    log = (out / "serve.log").read_text(errors="replace") if (out / "serve.log").exists() else ""
    assert done.returncode == 0, done.stderr[-3000:] + "\n--- serve.log ---\n" + log[-3000:]

    bench = json.loads((out / "bench.json").read_text())
    assert bench["model"] == gpu_proof.SMOKE_MODEL and bench["transformer_blocks"] == [1, 1]
    assert bench["size"] == "64x64" and bench["device"].startswith("CPU")
    modes = [row["mode"] for row in bench["rows"]]
    assert modes == ["diffusers eager (baseline)", "preset regular", "preset high", "preset none"]
    baseline, regular, high, none = bench["rows"]
    dtype = str(compute_dtype("cpu", synthetic=True)).removeprefix("torch.")  # fp32 without bf16 matmuls
    assert baseline["ran"] == f"plain FluxPipeline, {dtype}" and none["rel_error"] == 0.0
    # The fp8 fallback, reported: int8 where the CPU has int8 matrix units, else the loaded precision.
    int8 = detect_hardware("cpu").int8_matmul
    assert ("ran int8 dynamic instead" if int8 else "which this CPU lacks") in regular["note"]
    assert "MagCache" in high["ran"] and "fixed skip schedule" in high["note"]
    assert all(row["seconds"] > 0 and row["vs_floor"] > 0 for row in bench["rows"])
    (plan,) = bench["memory_plans"]
    assert plan["plan"] == "fp8-offload-text" and plan["seconds"] > 0

    assert "error" not in bench
    serve = json.loads((out / "serve.json").read_text())
    assert serve["errors"] == {} and serve["skipped"] == []
    assert serve["ready_warm_s"] > 0 and serve["ready_cold_s"] > 0
    (worker,) = serve["health"]["workers"]
    assert (
        serve["health"]["model"] == gpu_proof.SMOKE_MODEL
        and serve["health"]["safety_checker"] == "not configured"
    )
    assert "random weights" in worker["detail"] and "no safety checker" in worker["detail"]
    single = serve["single"]
    assert single["median_end_to_end_s"] > single["median_inference_s"] > 0
    burst = serve["burst"]
    assert burst["requests"] == 3 and len(burst["inference_s"]) == 3 and burst["images_per_minute"] > 0
    assert len(burst["idle_gaps_ms"]) == 2 and all(
        gap is not None and gap >= 0 for gap in burst["idle_gaps_ms"]
    )
    by_asked = {row["requested"]: row for row in serve["presets"]}
    assert {row["ran"] for row in serve["presets"]} == {"none"} and by_asked["none"]["note"] is None
    for asked in ("regular", "high"):
        assert f"preset {asked!r} is not enabled on this server" in by_asked[asked]["note"]

    table = (out / "proof.md").read_text()
    assert table.startswith("**CPU smoke run**") and "## Targets" in table
    assert "what the server adds" in table and "fp8-offload-text" in table
    assert "## Failed or skipped" not in table
    assert "graph_breaks" not in table and "graphs / breaks" in table
    assert (out / "bench.log").exists()


def test_missing_parts_are_reported_as_not_measured() -> None:
    table = proof_table({})
    assert table.count("not measured") == 7 and "MISSED" not in table


def test_failed_and_skipped_steps_are_listed_with_their_reasons() -> None:
    serve = {"model": "synthetic", "device": "cuda", "size": "1024x1024", "steps": 28}
    serve |= {"errors": {"ready_cold_s": "ProofError: serve exited with 1"}, "skipped": ["burst: no time"]}
    serve |= {"ready_warm_s": 75.0}
    table = proof_table({"bench": {"error": "bench_gpu.py was stopped after 310 s"}, "serve": serve})
    assert "- bench: bench_gpu.py was stopped after 310 s" in table
    assert "- serve ready_cold_s: ProofError: serve exited with 1" in table
    assert "- serve skipped burst: no time" in table
    assert "| ready after start (warm compile cache) | 75.0 s | <= 60 s | MISSED |" in table
