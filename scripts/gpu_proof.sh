#!/usr/bin/env bash
# The GPU check on a bare device machine, from the repository root, in two commands (each
# under 6 minutes), with the wheels of scripts/make_device_wheels.sh carried in .whl/:
#
#   scripts/gpu_proof.sh bench    # presets vs bf16 eager at 1024x1024, 28 steps; memory plans
#   scripts/gpu_proof.sh serve    # flux-server serve --model synthetic, driven by fal_client
#
# Results (JSON, proof.md, serve.log) go to $OUT. `scripts/gpu_proof.sh smoke` runs both parts
# on the CPU with a small synthetic model (what tests/scripts/test_gpu_proof.py does).
set -euo pipefail
cd "$(dirname "$0")/.."

PART=${1:-all}
SITE=${FLUX_PROOF_SITE:-/tmp/site}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! python3 -c "import diffusers, fastapi, pydantic_settings, torchao, fal_client" 2>/dev/null; then
  if [ ! -d .whl ]; then
    echo "missing packages and no .whl/ folder: run scripts/make_device_wheels.sh and carry .whl" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

case "$PART" in
  smoke) exec python3 scripts/gpu_proof.py --cpu-smoke --part all --out "${OUT:-gpu-proof}" ;;
  bench | serve | all) exec python3 scripts/gpu_proof.py --part "$PART" --out "${OUT:-gpu-proof}" ;;
  *) echo "usage: scripts/gpu_proof.sh bench|serve|all|smoke" >&2; exit 2 ;;
esac
