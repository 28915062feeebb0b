#!/usr/bin/env bash
# The GPU check on a bare device machine, from the repository root, in two commands (each
# under 6 minutes), with the wheels of scripts/make_device_wheels.sh carried in .whl/:
#
#   scripts/gpu_proof.sh bench    # presets vs bf16 eager at 1024x1024, 28 steps; memory plans
#   scripts/gpu_proof.sh serve    # flux-server serve --model synthetic, driven by fal_client
#
# Results go to $OUT as they are measured (bench.json after every row, serve.json after every
# step, bench.log / serve.log with torch.compile's graph breaks and recompiles, versions.json,
# proof.md), so a command cut at its limit still returns what it measured.
# `scripts/gpu_proof.sh smoke [bench|serve|all]` runs the parts on the CPU with a small
# synthetic model (what tests/scripts/test_gpu_proof.py and scripts/rehearse_gpu_proof.sh do).
#
# Before measuring, the environment is checked against constraints/gpu.txt (the one set of
# versions): a missing or stale carried wheel, or a peft too old for LoRA hot-swap, stops here
# with a message (exit 2) instead of minutes into the run.
set -euo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
PY=${PYTHON:-python3}
SITE=${FLUX_PROOF_SITE:-/tmp/site}
OUT_DIR=${OUT:-gpu-proof}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Every graph break and recompile, with its reason, in bench.log / serve.log.
export TORCH_LOGS=${TORCH_LOGS:-graph_breaks,recompiles}
WHEELS=${FLUX_PROOF_WHEELS:-.whl}
if [ -d "$WHEELS" ]; then
  # Always, not only when an import fails: a device package at another version (peft, say)
  # is shadowed by the carried one ($SITE comes first on PYTHONPATH).
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
fi
if ! "$PY" scripts/gpu_lock.py check --json "$OUT_DIR/versions.json"; then
  [ -d "$WHEELS" ] || echo "no $WHEELS/ folder: run scripts/make_device_wheels.sh and carry it" >&2
  exit 2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

# Models and compile caches: $FLUX_PROOF_DATA, else gpu_proof.py's default under /tmp.
DATA_ARGS=()
[ -z "${FLUX_PROOF_DATA:-}" ] || DATA_ARGS=(--data-dir "$FLUX_PROOF_DATA")
case "$PART" in
  smoke) exec "$PY" scripts/gpu_proof.py --cpu-smoke --part "${2:-all}" --out "$OUT_DIR" "${DATA_ARGS[@]}" ;;
  bench | serve | all) exec "$PY" scripts/gpu_proof.py --part "$PART" --out "$OUT_DIR" "${DATA_ARGS[@]}" ;;
  *) echo "usage: scripts/gpu_proof.sh bench|serve|all|smoke [bench|serve|all]" >&2; exit 2 ;;
esac
