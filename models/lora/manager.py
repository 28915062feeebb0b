"""LoraManager: a request's LoRAs on the shared pipeline, for that request only.

    manager = LoraManager(pipe, limits=LoraLimits(..., hotswap="lazy"),  # "off" | "lazy" | "eager"
                          compiled=<a compiled preset is enabled>)
    manager.prepare()                          # before warm-up/compile: slots now if "eager"
    with manager.apply([LoraSpec(name, file, scale), ...]) as run:
        ...                                    # run.eager_reason: compile must be off
    run.log                                    # lines for the job's log (loads, hits, the path)

Eager servers use plain named adapters (named.py). Servers with a compiled preset use hot-swap
slots (hotswap.py): made at the first LoRA request (`lazy`, the default: a server that never
sees a LoRA has no slot and compiles once), or at load on every linear layer (`eager`: LoRA
requests never compile, the cold start compiles the slotted graphs too). With `off`, a compiled
server runs LoRA requests eagerly on plain adapters. Either way the LoRAs are switched off
when the block ends, also on an error, so the next request without LoRAs computes exactly
what it did before any LoRA.
The same LoRA named twice in one request counts once, with the scales added.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from models.lora.errors import LoraError
from models.lora.hotswap import HotswapSlots
from models.lora.layers import compute_in
from models.lora.named import NamedAdapters
from models.lora.reading import LoadedLora, read_lora
from models.lora.spec import LoraLimits, LoraSpec, file_key


@dataclass
class LoraRun:
    log: list[str] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    eager_reason: str | None = None


@dataclass
class LoraStats:
    """Totals since start, for metrics: a hit is a LoRA that needed no reading from disk."""

    hits: int = 0
    misses: int = 0


class LoraManager:
    def __init__(self, pipe: Any, *, limits: LoraLimits, compiled: bool) -> None:
        self.pipe = pipe
        self.limits = limits
        self.compiled = compiled
        self.hotswap = compiled and limits.hotswap != "off"
        self.slots_at_load = self.hotswap and limits.hotswap == "eager"
        self.stats = LoraStats()
        self._lock = threading.Lock()
        # The compute dtype (diffusers reports it also when the weights are stored in fp8).
        self._dtype = pipe.transformer.dtype
        self.strategy: NamedAdapters | HotswapSlots
        if self.hotswap:
            self.strategy = HotswapSlots(
                pipe,
                read=self.read,
                rank=limits.hotswap_rank,
                slots=limits.max_per_request,
                max_loaded=limits.max_loaded,
            )
        else:
            self.strategy = NamedAdapters(pipe, read=self.read, max_loaded=limits.max_loaded)

    @property
    def mode(self) -> str:
        return "hotswap" if self.hotswap else "adapters"

    @property
    def slots_ready(self) -> bool:
        """Hot-swap slots exist (so warm-up compiles the graphs LoRA requests run)."""
        return isinstance(self.strategy, HotswapSlots) and self.strategy.prepared

    def prepare(self) -> None:
        """At load: the slots on every linear layer when they are made at load (`eager`)."""
        if self.slots_at_load and isinstance(self.strategy, HotswapSlots):
            self.strategy.prepare()
            compute_in(self.strategy.modules, self._dtype)

    def read(self, spec: LoraSpec) -> LoadedLora:
        return read_lora(
            spec,
            transformer=self.pipe.transformer,
            text_encoder=self.pipe.text_encoder,
            limits=self.limits,
            dtype=self._dtype,
        )

    def loaded(self) -> list[str]:
        """The LoRA files held in memory, least recently used first."""
        return [key[0] for key in self.strategy.loaded_keys()]

    @contextmanager
    def warm(self) -> Iterator[None]:
        """Every hot-swap slot on at scale 0 (the graph LoRA requests run), for warm-up."""
        if not isinstance(self.strategy, HotswapSlots) or not self.strategy.prepared:
            yield
            return
        with self._lock:
            try:
                self.strategy.activate_empty()
                yield
            finally:
                self.strategy.deactivate()

    @contextmanager
    def apply(self, specs: Sequence[LoraSpec]) -> Iterator[LoraRun]:
        run = LoraRun()
        if not specs:
            yield run
            return
        merged = self._merge(specs)
        if len(merged) > self.limits.max_per_request:
            raise LoraError(
                ", ".join(s.name for s in specs),
                f"{len(merged)} LoRAs in one request; "
                f"this server takes at most {self.limits.max_per_request}",
            )
        with self._lock:
            try:
                if isinstance(self.strategy, HotswapSlots):
                    run.hits, run.misses, run.eager_reason = self.strategy.activate(merged, run.log)
                else:
                    run.hits, run.misses = self.strategy.activate(merged, run.log)
                    if self.compiled:  # hot-swap off: adapters change the modules compile traced
                        run.eager_reason = "LoRA hot-swap is off (lora_hotswap=off)"
                        run.log.append(f"{run.eager_reason}: this request runs eager")
                compute_in(self.strategy.modules, self._dtype)
                self.stats.hits += run.hits
                self.stats.misses += run.misses
                run.log.append(
                    f"LoRA cache: {run.hits} hit(s), {run.misses} miss(es) this request; "
                    f"{self.stats.hits} hit(s), {self.stats.misses} miss(es) since start"
                )
                yield run
            finally:
                self.strategy.deactivate()

    @staticmethod
    def _merge(specs: Sequence[LoraSpec]) -> list[tuple[LoraSpec, float]]:
        merged: dict[tuple[str, int, int], tuple[LoraSpec, float]] = {}
        for spec in specs:
            key = file_key(spec)
            first, scale = merged.get(key, (spec, 0.0))
            merged[key] = (first, scale + spec.scale)
        return list(merged.values())
