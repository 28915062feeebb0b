#!/usr/bin/env bash
# Rehearse the device proof on a CPU, in an environment built like the lent device machine's,
# so that the first GPU run does not die on an import. Not a test: it downloads packages (the
# device's torch alone is a multi-GB CUDA build; see TORCH below).
#
#   scripts/rehearse_gpu_proof.sh [WORKDIR]      # default /tmp/flux-rehearsal
#
# 1. A fresh venv of the lock's Python (constraints/gpu.txt: 3.12) holding only what the device
#    holds: the lock's `device` pins (torch, triton, transformers, huggingface-hub, accelerate...)
#    and the unpinned packages the device image has (DEVICE_ALSO), all with --no-deps, so that
#    nothing the device lacks can hide a missing wheel. `pip check` says what the base lacks.
# 2. The carried wheels, by scripts/make_device_wheels.sh for that Python.
# 3. scripts/gpu_proof.sh smoke serve, then bench, exactly as on the device: the wheels installed with
#    --no-index --no-deps into a --target folder first on PYTHONPATH, the environment checked
#    against the lock, then both parts (bench, and serve driven by the real fal_client) on a
#    small synthetic model. Then `pip check` over base + carried: every requirement of a
#    carried package must be met by the device or the carried wheels.
#
# Settings (environment):
#   PYTHON  the interpreter (default: python<lock's version>, e.g. python3.12)
#   TORCH   what to install for torch (default: torch==<lock's version>, which on Linux is
#           the CUDA build with its CUDA wheels, gigabytes); a CPU wheel of another version,
#           e.g. TORCH=/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl,
#           rehearses everything but torch's own version (say so with the result).
#   OVERRIDES  device pins to replace, "name==version ...", where the lock's version has no
#           wheel for PYTHON (numpy 2.5 needs Python 3.12: OVERRIDES="numpy==2.4.6" on 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${1:-/tmp/flux-rehearsal}
LOCK_PYTHON=$(python3 scripts/gpu_lock.py python)
PY=${PYTHON:-python$LOCK_PYTHON}
TORCH=${TORCH:-torch==$(python3 scripts/gpu_lock.py get torch)}
# On the device image too (KINDS.md's package list), versions not pinned by the lock; what the
# proof and the lock's device packages import.
DEVICE_ALSO=(
  filelock fsspec jinja2 markupsafe networkx sympy mpmath typing-extensions "setuptools<82" packaging
  pyyaml regex requests urllib3 idna certifi charset-normalizer tqdm httpx httpcore anyio h11
  hf-xet typer click shellingham rich markdown-it-py mdurl pygments psutil pillow protobuf
  prometheus-client aiofiles msgpack uvloop annotated-doc
)
log() { echo "rehearse: $*" >&2; }

rm -rf "$WORK"
mkdir -p "$WORK"
"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
PYTHON_VERSION=$("$VPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$PYTHON_VERSION" = "$LOCK_PYTHON" ] || log "Python $PYTHON_VERSION here; the device has $LOCK_PYTHON"

log "1/3 the device's packages (--no-deps): $TORCH, the lock's device pins, ${#DEVICE_ALSO[@]} more"
read -r -a REPLACED <<<"${OVERRIDES:-}"
DEVICE_PINS=()
while read -r pin; do
  name=${pin%%==*}
  [ "$name" = torch ] && continue
  for override in "${REPLACED[@]}"; do
    [ "${override%%==*}" = "$name" ] && pin=$override && log "instead of the device's $name: $override"
  done
  DEVICE_PINS+=("$pin")
done < <("$VPY" scripts/gpu_lock.py device)
"$VPY" -m pip install -q --no-deps "$TORCH" "${DEVICE_PINS[@]}" "${DEVICE_ALSO[@]}"
"$VPY" -m pip check >"$WORK/pip-check-device.txt" 2>&1 || log "the base lacks (not a device fault):
$(cat "$WORK/pip-check-device.txt")"

log "2/3 the carried wheels for Python $PYTHON_VERSION"
PYTHON=$VPY PYTHON_VERSION=$PYTHON_VERSION scripts/make_device_wheels.sh "$WORK/wheels" >/dev/null

# The server first: its imports (fastapi, pydantic, uvicorn, fal_client) are what a first run
# died on; the bench, slow on a CPU (a bf16 synthetic model), second.
status=0
for part in serve bench; do
  log "3/3 scripts/gpu_proof.sh smoke $part, as on the device"
  part_status=0
  PYTHON=$VPY FLUX_PROOF_SITE=$WORK/site FLUX_PROOF_WHEELS=$WORK/wheels FLUX_PROOF_DATA=$WORK/data \
    OUT=$WORK/out scripts/gpu_proof.sh smoke "$part" >>"$WORK/proof.log" 2>&1 || part_status=$?
  log "gpu_proof.sh smoke $part exited $part_status; log: $WORK/proof.log, results: $WORK/out"
  [ "$part_status" -eq 0 ] || status=$part_status
done

# Every requirement of a carried package met by the device's packages or another carried one.
PYTHONPATH=$WORK/site "$VPY" -m pip check >"$WORK/pip-check-carried.txt" 2>&1 || true
missing=$(grep -i "which is not installed" "$WORK/pip-check-carried.txt" || true)
if [ -n "$missing" ]; then
  log "requirements met neither by the device nor by a carried wheel:
$missing"
  [ "$status" -ne 0 ] || status=3
fi
"$VPY" -c "import torch, triton, transformers, huggingface_hub as h, sys; print('rehearsed on Python', \
sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', \
transformers.__version__, 'huggingface_hub', h.__version__)"
cat "$WORK/out/versions.json" 2>/dev/null | "$VPY" -c "import json, sys; v = json.load(sys.stdin); \
print('gpu_lock differences:', v['notes'] or 'none'); print('gpu_lock errors:', v['errors'] or 'none')" || true
[ -f "$WORK/out/proof.md" ] && sed -n '1,40p' "$WORK/out/proof.md"
exit "$status"
