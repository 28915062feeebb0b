#!/usr/bin/env bash
# Runs the whole test suite; does all set-up first (see scripts/setup.sh). The dependency
# rules (import-linter contracts in pyproject.toml) are checked first: a new import circle
# or a protocol importing another fails the suite before any test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
