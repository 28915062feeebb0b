"""Plain diffusers adapters for eager presets: one peft adapter per LoRA, kept loaded (LRU).

Loading a LoRA injects a named adapter into the shared transformer (and CLIP text encoder);
a repeated LoRA is already there and costs nothing; beyond `max_loaded` adapters the least
recently used one is deleted. Not for compiled models: every new adapter changes the module
structure that a compiled graph guards on (see hotswap.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from models.lora.layers import activate, deactivate
from models.lora.reading import LoadedLora
from models.lora.spec import LoraSpec, file_key

logger = logging.getLogger(__name__)

ReadLora = Callable[[LoraSpec], LoadedLora]
# Process-wide: adapter names must stay unique on a pipeline even across managers.
_adapter_numbers = itertools.count()


class NamedAdapters:
    def __init__(self, pipe: Any, *, read: ReadLora, max_loaded: int) -> None:
        self.pipe = pipe
        self.read = read
        self.max_loaded = max(1, max_loaded)
        self._loaded: OrderedDict[tuple[str, int, int], str] = OrderedDict()  # file key -> adapter

    @property
    def modules(self) -> list[Any]:
        return [m for m in (self.pipe.transformer, self.pipe.text_encoder) if m is not None]

    def loaded_keys(self) -> list[tuple[str, int, int]]:
        return list(self._loaded)

    def activate(self, specs: Sequence[tuple[LoraSpec, float]], log: list[str]) -> tuple[int, int]:
        """Load what is missing, then activate exactly these adapters; returns (hits, misses)."""
        hits = misses = 0
        scales: dict[str, float] = {}
        keep = {file_key(spec) for spec, _ in specs}
        for spec, scale in specs:
            key = file_key(spec)
            adapter = self._loaded.get(key)
            if adapter is not None:
                self._loaded.move_to_end(key)
                hits += 1
                log.append(f"LoRA {spec.name}: already loaded (adapter {adapter})")
            else:
                misses += 1
                started = time.perf_counter()
                lora = self.read(spec)
                adapter = f"lora_{next(_adapter_numbers)}"
                self._evict(keep)
                self.pipe.load_lora_weights(dict(lora.state_dict), adapter_name=adapter)
                self._loaded[key] = adapter
                log.append(
                    f"LoRA {spec.name}: loaded as adapter {adapter} (rank {lora.rank}, "
                    f"{lora.nbytes / 1024**2:.1f} MB) in {time.perf_counter() - started:.2f} s"
                )
            scales[adapter] = scale
        activate(self.modules, scales)
        return hits, misses

    def deactivate(self) -> None:
        deactivate(self.modules)

    def unload_all(self) -> None:
        if self._loaded:
            self.pipe.delete_adapters(list(self._loaded.values()))
            self._loaded.clear()

    def _evict(self, keep: set[tuple[str, int, int]]) -> None:
        """Make room for one more adapter, never unloading one the current request uses."""
        while len(self._loaded) >= self.max_loaded:
            victim = next((k for k in self._loaded if k not in keep), None)
            if victim is None:
                return
            adapter = self._loaded.pop(victim)
            self.pipe.delete_adapters(adapter)
            logger.info("LoRA adapter %s unloaded (least recently used)", adapter)
