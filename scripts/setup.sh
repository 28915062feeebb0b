#!/usr/bin/env bash
# Idempotent set-up: .venv at the repository root with torch, the project and its test extra,
# plus the Node client used by the end-to-end tests. Safe to run again; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

# A machine with an NVIDIA GPU gets the versions of constraints/gpu.txt (the one set of GPU
# versions: torch for CUDA 13.0 and the libraries tested with it); without one, the CPU build,
# pinned so that pip takes the local file instead of downloading a multi-GB CUDA build.
CONSTRAINTS=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  CONSTRAINTS=(-c constraints/gpu.txt)
fi
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ ${#CONSTRAINTS[@]} -gt 0 ]; then
    "$VPY" -m pip install -q "${CONSTRAINTS[@]}" torch
  else
    "$VPY" -m pip install -q torch==2.13.0
  fi
fi

stamp=.venv/.flux-setup-stamp
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints/gpu.txt -nt "$stamp" ]; then
  "$VPY" -m pip install -q "${CONSTRAINTS[@]}" -e ".[test]"
  touch "$stamp"
fi

# PostgreSQL for the queue tests: the binaries the pgserver package ships, else Debian's.
if ! "$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('pgserver') is None)" \
  && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# @fal-ai/client for the JavaScript end-to-end tests, and esbuild to bundle it for a browser
# page (npm registry).
if [ "${FLUX_SKIP_NODE:-0}" != "1" ] && command -v npm >/dev/null 2>&1; then
  if [ ! -d tests/e2e/js/node_modules/@fal-ai/client ] || [ ! -x tests/e2e/js/node_modules/.bin/esbuild ]; then
    (cd tests/e2e/js && npm install --no-audit --no-fund --silent)
  fi
fi

# kubectl for the Kubernetes manifest tests (`kubectl kustomize` renders offline; Debian's
# package is kubernetes-client).
if ! command -v kubectl >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq kubernetes-client) >/dev/null 2>&1 \
      || echo "setup: could not install kubectl; the deploy tests will fail" >&2
  fi
fi

# Headless Chromium for the browser tests (Debian's package; Playwright drives it and never
# downloads a browser of its own).
if [ "${FLUX_SKIP_BROWSER:-0}" != "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || echo "setup: could not install chromium; the browser tests will fail" >&2
  fi
fi
