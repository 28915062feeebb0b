"""Which GPU each worker of `flux-server serve` gets; without importing torch.

With `CUDA_VISIBLE_DEVICES` set (Slurm, shared boxes, containers), its entries are the GPUs
this box may use, AS GIVEN: indices ("2,3"), UUIDs ("GPU-8f6c..."), MIG ids ("MIG-..."). Worker
i gets the i-th entry (round robin when there are more workers than entries) and runs with
`CUDA_VISIBLE_DEVICES=<entry>`, so that it sees exactly that one device as cuda:0. Without the
variable, the GPUs `nvidia-smi -L` lists are numbered 0..n-1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from server.config import Settings
from server.supervisor.preflight import ConfigError


@dataclass(frozen=True)
class WorkerSlot:
    """One worker of this box: its id in the queue, and its GPU entry (None: the CPU)."""

    worker_id: str
    gpu: str | None

    @property
    def device(self) -> str:
        """How /health and the banner name the device: cuda:<index>, or the UUID/MIG id."""
        if self.gpu is None:
            return "cpu"
        return f"cuda:{self.gpu}" if self.gpu.isdigit() else self.gpu


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `--gpu` entries for the workers."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries: list[str] = []
        for item in (v.strip() for v in visible.split(",")):
            # CUDA stops at the first invalid entry; "-1" is the usual way to hide every GPU.
            if not item or item.startswith("-"):
                break
            entries.append(item)
        return entries
    return [str(index) for index in range(nvidia_smi_gpu_count())]


def nvidia_smi_gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def plan_workers(settings: Settings, gpus: Sequence[str] | None = None) -> list[WorkerSlot]:
    """One worker per visible GPU (or --workers N spread over them), else one CPU worker; none
    on an API-only box. With a shared queue, ids start with the box name (unique across boxes).
    `gpus`: the GPU entries to plan with (default: `visible_gpus()`)."""
    if settings.role == "api":
        return []
    prefix = f"{settings.box}-" if settings.shared_queue else ""
    entries = [] if settings.device == "cpu" else list(visible_gpus() if gpus is None else gpus)
    if settings.device == "cuda" and not entries:
        raise ConfigError("--device cuda, but no GPU is visible (nvidia-smi -L / CUDA_VISIBLE_DEVICES)")
    count = settings.workers or (len(entries) if entries else 1)
    return [WorkerSlot(f"{prefix}w{i}", entries[i % len(entries)] if entries else None) for i in range(count)]
