"""LoRA slots for compiled presets: switching LoRAs copies weights, never recompiles.

Slots exist only once LoRAs are used: `prepare(targets)` runs at the first LoRA request (the
`lazy` setting, the default) or at load for every linear layer (`eager`). It calls diffusers'
`enable_lora_hotswap(target_rank=rank)` and loads `slots` zero LoRAs of that rank
("hotswap_0", ...) on exactly the `targets` layers: peft wraps only those, so a server that
never sees a LoRA computes (and compiles) the plain model, and one whose LoRAs adapt only the
attention projections pays for slots there only. A request's LoRAs are then copied into the
slots with `hotswap=True` (smaller ranks are zero-padded, slotted layers a LoRA does not adapt
are zeroed) and each slot's scale is written into its scaling tensor; unused slots get scale
0. All slots stay active on every LoRA request, so any mix of LoRAs runs the same graph.

A LoRA that adapts layers outside the slots widens them: the slots are rebuilt on the union of
the layers (once per new set of layers; compiled presets recompile once, which the compile
metrics count). The rank is fixed (`LoraLimits.hotswap_rank`, 64 by default: most published
FLUX LoRAs are rank 4-64); a LoRA of a higher rank runs on the slower path below.

A LoRA in a slot stays there until the slot is needed for another one (the least recently
used slot goes first), and up to `max_loaded` LoRAs stay read in memory (least recently used
dropped), so a repeated LoRA costs at most one copy into its slot.

What hot-swap cannot take (text-encoder layers: the text encoder is not slotted; a rank above
the slots') runs on the slower path: loaded as an ordinary adapter for this request only, with
compile switched off, and deleted afterwards. peft leaves its wrapper on each layer the adapter
touched (holding no adapter): where those layers were not slotted yet, the next compiled
request compiles once more for the new module structure.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from models.lora.layers import activate, deactivate
from models.lora.reading import LoadedLora, linear_dims
from models.lora.spec import LoraSpec, file_key

logger = logging.getLogger(__name__)

FileKey = tuple[str, int, int]


class HotswapSlots:
    def __init__(
        self, pipe: Any, *, read: Callable[[LoraSpec], LoadedLora], rank: int, slots: int, max_loaded: int
    ) -> None:
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.read = read
        self.rank = rank
        self.names = [f"hotswap_{i}" for i in range(max(1, slots))]
        self.max_loaded = max(1, max_loaded)
        self._slot_holds: list[FileKey | None] = [None] * len(self.names)
        self._slot_used = [0.0] * len(self.names)  # when each slot last served a request
        self._in_memory: OrderedDict[FileKey, LoadedLora] = OrderedDict()
        self._temporary: list[str] = []
        self._temporary_names = itertools.count()
        self.targets: frozenset[str] = frozenset()  # the slotted transformer layers
        self.prepared = False

    @property
    def modules(self) -> list[Any]:
        return [m for m in (self.transformer, self.pipe.text_encoder) if m is not None]

    def loaded_keys(self) -> list[FileKey]:
        return list(self._in_memory)

    def prepare(self, targets: Iterable[str] | None = None) -> None:
        """Slots on `targets` (transformer layer names; None: every linear layer), or on the
        union with the layers slotted already. Before a compiled call, else that graph
        compiles again; a widening rebuild drops what the slots held."""
        import torch

        wanted = None if targets is None else frozenset(targets) | self.targets
        if self.prepared and wanted is not None and wanted <= self.targets:
            return  # every LoRA request with slotted layers only: nothing to do
        every = linear_dims(self.transformer)
        wanted = frozenset(every) if wanted is None else wanted
        if self.prepared and wanted <= self.targets:
            return
        if self.prepared:
            logger.info(
                "LoRA hot-swap: widening the slots from %d to %d layers (compiled presets compile once more)",
                len(self.targets),
                len(wanted),
            )
            self.transformer.delete_adapters(self.names)
            self._slot_holds = [None] * len(self.names)
        dtype = self.transformer.dtype  # the compute dtype, also under fp8 storage
        zeros: dict[str, torch.Tensor] = {}
        for module in sorted(wanted):
            fan_in, fan_out = every[module]
            zeros[f"{module}.lora_A.weight"] = torch.zeros(self.rank, fan_in, dtype=dtype)
            zeros[f"{module}.lora_B.weight"] = torch.zeros(fan_out, self.rank, dtype=dtype)
        for name in self.names:
            # Once per slot: diffusers prepares (tensor scalings, padding) only the next load.
            self.transformer.enable_lora_hotswap(target_rank=self.rank, check_compiled="ignore")
            self.transformer.load_lora_adapter(dict(zeros), adapter_name=name, prefix=None)
        deactivate(self.modules)
        self.targets = wanted
        self.prepared = True
        logger.info(
            "LoRA hot-swap: %d slot(s) of rank %d on %d of the transformer's %d linear layers",
            len(self.names),
            self.rank,
            len(wanted),
            len(every),
        )

    def activate(
        self, specs: Sequence[tuple[LoraSpec, float]], log: list[str]
    ) -> tuple[int, int, str | None]:
        """Returns (hits, misses, why this request must run eager or None)."""
        hits = misses = 0
        loras: list[tuple[LoadedLora, float, bool]] = []
        for spec, scale in specs:
            key = file_key(spec)
            lora = self._in_memory.get(key)
            if lora is not None:
                self._in_memory.move_to_end(key)
                hits += 1
            else:
                misses += 1
                started = time.perf_counter()
                lora = self.read(spec)
                self._remember(lora)
                log.append(
                    f"LoRA {spec.name}: read (rank {lora.rank}, {lora.nbytes / 1024**2:.1f} MB) "
                    f"in {time.perf_counter() - started:.2f} s"
                )
            loras.append((lora, scale, key in self._slot_holds))
        # Slots on the layers these LoRAs adapt (at the first LoRA request, or wider now).
        slotted = [lora for lora, _, _ in loras if self._slower_path_reason(lora) is None]
        if slotted:
            self.prepare(
                module.removeprefix("transformer.")
                for lora in slotted
                for module in lora.targets
                if module.startswith("transformer.")
            )

        eager_reasons: list[str] = []
        scales: dict[str, float] = dict.fromkeys(self.names, 0.0)
        wanted = {lora.key for lora, _, _ in loras}
        # Slots this request does not need, empty ones first, then the least recently used.
        free = sorted(
            (i for i, held in enumerate(self._slot_holds) if held not in wanted),
            key=lambda i: (self._slot_holds[i] is not None, self._slot_used[i]),
        )
        for lora, scale, _ in loras:
            reason = self._slower_path_reason(lora)
            if reason is not None:
                name = f"eager_{next(self._temporary_names)}"
                self.pipe.load_lora_weights(dict(lora.state_dict), adapter_name=name)
                self._temporary.append(name)
                scales[name] = scale
                eager_reasons.append(reason)
                log.append(f"{reason}: this request runs eager (the slower path)")
                continue
            slot = self._slot_holds.index(lora.key) if lora.key in self._slot_holds else free.pop(0)
            if self._slot_holds[slot] == lora.key:
                log.append(f"LoRA {lora.name}: already in hot-swap slot {slot}")
            else:
                started = time.perf_counter()
                self._slot_holds[slot] = None  # a failed copy must not leave a stale claim
                self.transformer.load_lora_adapter(
                    dict(lora.state_dict), adapter_name=self.names[slot], prefix="transformer", hotswap=True
                )
                self._slot_holds[slot] = lora.key
                log.append(
                    f"LoRA {lora.name}: hot-swapped into slot {slot} in {time.perf_counter() - started:.3f} s"
                )
            scales[self.names[slot]] = scale
            self._slot_used[slot] = time.monotonic()
        activate(self.modules, scales)
        return hits, misses, "; ".join(eager_reasons) or None

    def _slower_path_reason(self, lora: LoadedLora) -> str | None:
        if lora.has_text_encoder:
            return f"LoRA {lora.name} adapts the text encoder, which hot-swap cannot take"
        if lora.rank > self.rank:
            return f"LoRA {lora.name} has rank {lora.rank}, above the hot-swap slots' rank {self.rank}"
        return None

    def activate_empty(self) -> None:
        """All slots on, at scale 0: the graph every LoRA request runs, without any LoRA."""
        activate(self.modules, dict.fromkeys(self.names, 0.0))

    def deactivate(self) -> None:
        deactivate(self.modules)
        if self._temporary:
            self.pipe.delete_adapters(self._temporary)
            self._temporary = []

    def _remember(self, lora: LoadedLora) -> None:
        self._in_memory[lora.key] = lora
        while len(self._in_memory) > self.max_loaded:
            self._in_memory.popitem(last=False)
