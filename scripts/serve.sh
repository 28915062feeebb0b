#!/usr/bin/env bash
# Starts flux-server (set-up included). With no --model / FLUX_MODEL it serves the tiny model.
set -euo pipefail
cd "$(dirname "$0")/.."
FLUX_SKIP_NODE=1 ./scripts/setup.sh
exec .venv/bin/flux-server serve "$@"
