#!/usr/bin/env bash
# Runs the whole test suite; does all set-up first (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
