"""Which variants' transformers are on the GPU: a budget, least recently used out, pins, and
never the variant of a running job.

    residency = Residency(weights_by_name, budget_bytes=..., host_budget_bytes=..., pinned={"dev"})
    with residency.use("fill") as swap:      # on the device for the whole block
        ...                                   # swap: None, or what was moved (seconds, source)
    residency.on_device()                     # ["dev", "fill"], for /health and /metrics
    residency.stats                           # swaps, swap seconds, evictions since start

The policy (how InvokeAI's model cache and ComfyUI's dynamic VRAM do it, see docs/variants.md):
- every variant has a home (models/variants/placement.py): pinned host memory while the host
  budget lasts, else a spill file on disk; pinned variants and the base get host homes first;
- the GPU budget is the device's memory minus a working reserve for activations minus what the
  shared components (text encoders, VAE) hold; `budget_bytes` None means no limit (a CPU);
- at start, variants move onto the device in order (pinned, the base, the rest) while they fit;
- a job's variant moves on when needed; the least recently used idle, unpinned variants leave
  until it fits; a variant with a running job never leaves: a `use` that needs its room waits
  until that job ends; a variant that can never fit (larger than the budget, or beside the
  pinned ones) raises ResidencyError, naming the figures.

The moves themselves are TransformerWeights' (placement.py); this module only decides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

logger = logging.getLogger(__name__)

GiB = 1024**3


class ResidencyError(Exception):
    """A variant cannot be put on the device under the configured budget (the operator's
    configuration, not the request)."""


class Weights(Protocol):
    """What the policy needs of a variant's weights (TransformerWeights)."""

    home: Literal["host", "disk"] | None
    on_device: bool

    def nbytes(self) -> int: ...
    def make_home(self, home: Literal["host", "disk"]) -> Literal["host", "disk"]: ...
    def to_device(self) -> None: ...
    def to_home(self) -> None: ...


@dataclass(frozen=True)
class Swap:
    """One move onto the device that a job waited for."""

    variant: str
    source: Literal["host", "disk"]
    seconds: float  # the move itself, the evictions included
    evicted: tuple[str, ...]


@dataclass
class ResidencyStats:
    swaps: int = 0
    swap_seconds: float = 0.0
    evictions: int = 0
    by_source: dict[str, int] = field(default_factory=dict)


@dataclass
class _Entry:
    weights: Weights
    nbytes: int
    pinned: bool
    running: int = 0
    last_used: float = 0.0


class Residency:
    def __init__(
        self,
        weights: dict[str, Weights],
        *,
        budget_bytes: int | None,
        host_budget_bytes: int | None = None,
        pinned: Iterable[str] = (),
        first: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`first`: names placed before the others at start (the base); `pinned` go before them."""
        pinned = set(pinned)
        unknown = sorted(pinned - set(weights))
        if unknown:
            raise ResidencyError(f"pinned variant(s) {', '.join(unknown)} are not served by this worker")
        self.budget_bytes = budget_bytes
        self.host_budget_bytes = host_budget_bytes
        self.clock = clock
        self.stats = ResidencyStats()
        self._cond = threading.Condition()
        self._entries = {name: _Entry(w, w.nbytes(), pinned=name in pinned) for name, w in weights.items()}
        firsts = [n for n in first if n in weights]
        self.order = sorted(weights, key=lambda n: (n not in pinned, n not in firsts, list(weights).index(n)))
        pinned_bytes = sum(e.nbytes for e in self._entries.values() if e.pinned)
        if budget_bytes is not None and pinned_bytes > budget_bytes:
            raise ResidencyError(
                f"the pinned variants ({', '.join(sorted(pinned))}) need {pinned_bytes / GiB:.2f} GiB "
                f"on the device, more than its budget of {budget_bytes / GiB:.2f} GiB"
            )
        self._place()

    def _place(self) -> None:
        """Homes (host while the host budget lasts, else disk), then the device while it fits."""
        host_used = 0
        for name in self.order:
            entry = self._entries[name]
            fits_host = self.host_budget_bytes is None or host_used + entry.nbytes <= self.host_budget_bytes
            home = entry.weights.make_home("host" if fits_host else "disk")
            host_used += entry.nbytes if home == "host" else 0
        used = 0
        for name in self.order:
            entry = self._entries[name]
            if self.budget_bytes is None or used + entry.nbytes <= self.budget_bytes:
                entry.weights.to_device()
                used += entry.nbytes
        logger.info("variants: %s", self.describe())

    # --- per job ----------------------------------------------------------------------------
    @contextmanager
    def use(self, name: str) -> Iterator[Swap | None]:
        """`name` on the device for the block; never evicted while inside it."""
        entry = self._entries[name]  # KeyError: the caller checks the name first
        with self._cond:
            swap = None
            while not entry.weights.on_device:
                self._check_can_ever_fit(name)
                victims = self._victims(name)
                if victims is None:  # only a running variant's room would do: wait for it
                    self._cond.wait()
                    continue
                swap = self._swap_in(name, victims)
            entry.running += 1
            entry.last_used = self.clock()
        try:
            yield swap
        finally:
            with self._cond:
                entry.running -= 1
                entry.last_used = self.clock()
                self._cond.notify_all()

    def _used(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.weights.on_device)

    def _check_can_ever_fit(self, name: str) -> None:
        if self.budget_bytes is None:
            return
        entry = self._entries[name]
        pinned = sum(e.nbytes for n, e in self._entries.items() if e.pinned and n != name)
        if entry.nbytes + pinned > self.budget_bytes:
            raise ResidencyError(
                f"variant {name!r} needs {entry.nbytes / GiB:.2f} GiB on the device; with the "
                f"pinned variants' {pinned / GiB:.2f} GiB that exceeds the budget of "
                f"{self.budget_bytes / GiB:.2f} GiB"
            )

    def _victims(self, name: str) -> list[str] | None:
        """The least recently used idle, unpinned variants whose leaving makes room for `name`
        ([] when it fits already), or None when only running ones would."""
        if self.budget_bytes is None:
            return []
        need = self._used() + self._entries[name].nbytes - self.budget_bytes
        victims: list[str] = []
        idle = sorted(
            (n for n, e in self._entries.items() if e.weights.on_device and not e.pinned and e.running == 0),
            key=lambda n: self._entries[n].last_used,
        )
        for victim in idle:
            if need <= 0:
                break
            victims.append(victim)
            need -= self._entries[victim].nbytes
        return victims if need <= 0 else None

    def _swap_in(self, name: str, victims: list[str]) -> Swap:
        entry = self._entries[name]
        started = time.perf_counter()
        for victim in victims:
            self._entries[victim].weights.to_home()
            self.stats.evictions += 1
        source = entry.weights.home or "host"
        entry.weights.to_device()
        seconds = time.perf_counter() - started
        self.stats.swaps += 1
        self.stats.swap_seconds += seconds
        self.stats.by_source[source] = self.stats.by_source.get(source, 0) + 1
        logger.info(
            "variant %s moved onto the device from %s in %.2f s%s",
            name,
            source,
            seconds,
            f" (evicted {', '.join(victims)})" if victims else "",
        )
        return Swap(name, source, seconds, tuple(victims))

    # --- reporting ---------------------------------------------------------------------------
    def on_device(self) -> list[str]:
        with self._cond:
            return [n for n in self.order if self._entries[n].weights.on_device]

    def describe(self) -> str:
        """One line for logs and /health: where each variant is."""
        places: dict[str, list[str]] = {"device": [], "host": [], "disk": []}
        for name in self.order:
            weights = self._entries[name].weights
            where = "device" if weights.on_device else (weights.home or "host")
            places[where].append(name + (" (pinned)" if self._entries[name].pinned else ""))
        parts = [f"{k}: {', '.join(v)}" for k, v in places.items() if v]
        return "; ".join(parts)
