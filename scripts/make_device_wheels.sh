#!/usr/bin/env bash
# Download the wheels a bare GPU machine needs to run scripts/gpu_proof.py into .whl/ (ignored).
#
# The device image has Python 3.12 with torch 2.11 (CUDA 13), transformers, accelerate,
# safetensors, tokenizers, sentencepiece, httpx, pillow and numpy, but no diffusers, torchao,
# fastapi or pydantic, and it reaches no package index. Run this on a connected machine (any
# CPU: the wheels are picked for the device's platform), then carry .whl/ to the device, where
# scripts/gpu_proof.sh installs them with --no-index. Versions match this project's own
# environment; torchao 0.18 is built against torch 2.11's stable ABI.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${1:-.whl}
PY=${PYTHON:-python3}
WHEELS=(
  diffusers==0.42.1
  importlib-metadata==10.2.0
  zipp==4.1.2
  torchao==0.18.0
  fastapi==0.165.0
  starlette==1.10.0
  annotated-doc==0.0.7
  pydantic==2.14.4
  pydantic-core==2.50.5
  pydantic-settings==2.16.3
  python-dotenv==1.2.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  uvicorn==0.54.0
  python-multipart==0.0.34
  cryptography==50.0.2
  cffi==2.1.1
  pycparser==3.12
  fal-client==1.0.3
  asyncstdlib==3.14.0
  httpx-sse==0.4.3
  websockets==17.4
)

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
du -sh "$DEST"
ls "$DEST"
