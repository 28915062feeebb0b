"""Dockerfile.cuda: hadolint-clean, non-root, a HEALTHCHECK (no container runtime here, so it
is linted, not built). Its versions come from constraints/gpu.txt: tests/test_gpu_versions.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile.cuda"


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_server_runs_unprivileged_with_a_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    # Liveness: `flux-server health` without --ready (a worker retrying its model is no reason
    # to restart the container).
    assert re.search(r'^HEALTHCHECK .*CMD \["flux-server", "health"\]$', text, re.MULTILINE)
