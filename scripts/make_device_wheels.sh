#!/usr/bin/env bash
# Download the wheels a bare GPU machine needs to run scripts/gpu_proof.py into .whl/ (ignored).
#
# Which ones, at which versions: the packages constraints/gpu.txt marks `carried` (the lock
# that Dockerfile.cuda and the README's GPU install use too). The device image has Python 3.12
# with torch 2.11 (CUDA 13), transformers, accelerate, safetensors, tokenizers, sentencepiece,
# httpx, pillow and numpy (the lock's `device` lines), but no diffusers, torchao, fastapi or
# pydantic, and it reaches no package index. Run this on a connected machine (any CPU: the
# wheels are picked for the device's platform and Python), then carry .whl/ to the device,
# where scripts/gpu_proof.sh installs them with --no-index --no-deps.
#
#   scripts/make_device_wheels.sh [DEST]     # DEST defaults to .whl
#   PYTHON_VERSION=3.11 scripts/make_device_wheels.sh /tmp/wheels   # for another Python
#     (scripts/rehearse_gpu_proof.sh does this when no Python 3.12 is at hand)
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${1:-.whl}
PY=${PYTHON:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-$("$PY" scripts/gpu_lock.py python)}
mapfile -t WHEELS < <("$PY" scripts/gpu_lock.py carried)

mkdir -p "$DEST"
# One version of each package in DEST: an older download of a re-pinned package would make
# the --no-deps install on the device fail (two versions of one name).
for pin in "${WHEELS[@]}"; do
  name=${pin%%==*}
  version=${pin#*==}
  pattern=$(echo "$name" | tr '-' '_')
  for old in "$DEST"/"$pattern"-*.whl "$DEST"/"$name"-*.whl; do
    [ -e "$old" ] || continue
    case "$(basename "$old")" in
      "$pattern-$version-"* | "$name-$version-"*) ;;
      *) rm -f "$old" ;;
    esac
  done
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
du -sh "$DEST"
ls "$DEST"
