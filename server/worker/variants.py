"""The worker's side of the FLUX.1 [dev] family's variants: what it loads and serves, which
queued jobs it takes and prefers, and what /metrics says about its GPU's variants.

    variants = WorkerVariants(settings, worker_id)
    load_runtime(..., variants=variants.options())
    queue.claim(worker_id, timeout, prefer=variants.preference(runtime, lora_preference))
    variants.record(runtime, generation)      # after each job: swaps and what is resident

Claims (server/queue/base.py ClaimPreference):
- a worker that serves only some variants (`worker_variants`) never takes a job of a variant
  another worker serves (`can_take`); a job naming a variant no worker is configured with is
  taken, and fails with the runtime's clear error (it would otherwise wait forever);
- while some of its variants are off its GPU, it prefers queued jobs whose variant is on it
  (no swap), within ClaimPreference's window and `max_wait`, as LoRA affinity does; when every
  variant it serves is on its GPU, the LoRA preference applies as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from models.request import BASE_VARIANT
from models.variants.serving import VariantOptions
from models.variants.spec import configured_variants
from server import metrics
from server.config import Settings
from server.jobs import Job
from server.queue.base import ClaimPreference

if TYPE_CHECKING:
    from models.runtime import FluxRuntime, Generation

# A worker that serves only some variants looks further down the queue for jobs it can take.
RESTRICTED_WINDOW = 32
WINDOW = ClaimPreference.window
MAX_WAIT = ClaimPreference.max_wait  # the starvation bound: a head this old goes first


class WorkerVariants:
    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.serve = settings.variants_of_worker(worker_id)  # None: every configured variant
        self.configured = {BASE_VARIANT, *configured_variants(settings.variants, model=settings.model)}

    def options(self) -> VariantOptions:
        settings = self.settings
        return VariantOptions(
            configured=settings.variants,
            serve=None if self.serve is None else [n for n in self.serve if n != BASE_VARIANT],
            pinned=tuple(settings.pin_variants),
            gpu_budget_bytes=settings.variant_gpu_budget_bytes,
            gpu_reserve_bytes=settings.variant_gpu_reserve_bytes,
            host_budget_bytes=settings.variant_host_budget_bytes,
            box_workers=settings.workers or 1,
            spill_dir=settings.data_dir / "variant-spill" / self.worker_id,
        )

    def serves(self, variant: str) -> bool:
        return self.serve is None or variant in self.serve

    def can_take(self, job: Job) -> bool:
        """Its own variants, and variants nobody is configured with (to fail them clearly)."""
        return self.serves(job.variant) or job.variant not in self.configured

    def preference(self, runtime: FluxRuntime, loras: ClaimPreference | None) -> ClaimPreference | None:
        """The claim preference: variants on the GPU first while some are off it, else `loras`."""
        can_take = None if self.serve is None else self.can_take
        wants: Callable[[Job], bool] | None = loras.wants if loras is not None else None
        if runtime.residency is not None:
            resident = set(runtime.residency.on_device())
            if any(name not in resident and self.serves(name) for name in runtime.variants):
                wants = lambda job: job.variant in resident  # noqa: E731 - a predicate, like the LoRAs'
        if wants is None and can_take is None:
            return None
        return ClaimPreference(
            wants=wants or (lambda _job: False),
            can_take=can_take,
            window=RESTRICTED_WINDOW if can_take is not None else WINDOW,
            max_wait=MAX_WAIT,
        )

    def record(self, runtime: FluxRuntime, generation: Generation | None = None) -> None:
        """/metrics: the swap a job waited for, and which variants are on the GPU now."""
        if generation is not None and generation.swap is not None:
            swap = generation.swap
            metrics.record_swap(self.worker_id, swap.variant, swap.source, swap.seconds)
        resident = (
            set(runtime.residency.on_device()) if runtime.residency is not None else set(runtime.variants)
        )
        metrics.record_variants(self.worker_id, {name: name in resident for name in runtime.variants})
