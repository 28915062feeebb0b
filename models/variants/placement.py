"""Where one variant's transformer weights are: on the device, or only at their home (torch).

    weights = TransformerWeights("fill", modules=lambda: [transformer], device="cuda", spill_dir=...)
    weights.make_home("host")     # or "disk": once, at load, as the residency manager decides
    weights.to_device()           # seconds: from pinned host memory (or read from the spill file)
    weights.to_home()             # the device copy is dropped; nothing is copied back

A variant's home is pinned host memory (a copy that stays for as long as the worker runs, so
that a move onto the GPU is one DMA copy and leaving the GPU copies nothing) or, when host
memory is short, a spill file in the data directory written once at load (every form the
memory plan and presets gave the weights: fp8 storage, fused copies...), read back on the next
move. Tensors added after the home was made (LoRA hot-swap slots, adapters) and LoRA tensors,
which requests rewrite, are copied to host memory when leaving and back when coming, as they
are (small).

On a CPU device, host and device are the same memory: `to_device`/`to_home` with a host home
move nothing (the bookkeeping and its timing still run); a disk home really frees the tensors
and really reads them back, which is how the CPU tests prove a swap gives the same pixels.

`modules()` is called at every move: a preset's weight-set copy or a LoRA slot made later is
moved with the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Home = Literal["host", "disk"]


def _mutable(name: str) -> bool:
    """Tensors that requests rewrite in place (LoRA slots and adapters)."""
    return "lora_" in name


def tensor_bytes(tensor: Any) -> int:
    return int(tensor.numel()) * int(tensor.element_size())


class TransformerWeights:
    def __init__(self, name: str, *, modules: Callable[[], list[Any]], device: str, spill_dir: Path) -> None:
        self.name = name
        self.modules = modules
        self.device = device
        self.spill_file = Path(spill_dir) / f"{name}.safetensors"
        self.home: Home | None = None
        self.on_device = True  # loaded there (CPU) or placed there by the loader
        self._host: dict[str, Any] = {}  # home copies (host home), by tensor name
        self._spilled: set[str] = set()  # names in the spill file (disk home)
        self._away: dict[str, Any] = {}  # mutable / later tensors while off the device

    @property
    def on_cpu(self) -> bool:
        return str(self.device).startswith("cpu")

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """(unique name, parameter or buffer) of every module, each tensor once."""
        seen: set[int] = set()
        for index, module in enumerate(self.modules()):
            for prefix, named in (("p", module.named_parameters()), ("b", module.named_buffers())):
                for name, tensor in named:
                    if id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    yield f"{index}.{prefix}.{name}", tensor

    def nbytes(self) -> int:
        return sum(tensor_bytes(t) for _, t in self.tensors())

    # --- at load ---------------------------------------------------------------------------
    def make_home(self, home: Home) -> Home:
        """Make the home copy from wherever the loader left the weights, then leave them there
        (off the device: the residency manager moves on what fits). Returns the home made:
        "host" when a spill file cannot hold the weights."""
        if home == "disk":
            try:
                self._write_spill()
            except Exception as exc:  # tensor subclasses (torchao) have no safetensors form
                logger.warning(
                    "variant %s: cannot spill its weights to %s (%s: %s): kept in host memory instead",
                    self.name,
                    self.spill_file,
                    type(exc).__name__,
                    exc,
                )
                home = "host"
        if home == "host":
            for name, tensor in self.tensors():
                if not _mutable(name):
                    copy = tensor.data.to("cpu")  # the same tensor when it is on the CPU already
                    self._host[name] = copy if self.on_cpu else _pinned(copy, self.name)
        self.home = home
        self.on_device = True  # held somewhere: to_home puts every tensor in its place
        self.to_home()
        return home

    def _write_spill(self) -> None:
        from safetensors.torch import save_file

        self.spill_file.parent.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().contiguous().cpu() for name, t in self.tensors() if not _mutable(name)}
        partial = self.spill_file.with_suffix(".partial")
        save_file(state, str(partial))
        partial.replace(self.spill_file)
        self._spilled = set(state)

    # --- moves -----------------------------------------------------------------------------
    def to_device(self) -> None:
        """Onto the device: home copies copied (host) or read (disk), the rest moved back."""
        import torch

        if self.on_device:
            return
        spilled: Any = None
        if self.home == "disk":
            from safetensors import safe_open

            spilled = safe_open(str(self.spill_file), framework="pt", device=str(self.device))
        with torch.no_grad():
            for name, tensor in self.tensors():
                if name in self._away:
                    tensor.data = self._away.pop(name).to(self.device)
                elif spilled is not None and name in self._spilled:
                    tensor.data = spilled.get_tensor(name)
                elif name in self._host:
                    home = self._host[name]
                    tensor.data = home if self.on_cpu else home.to(self.device, non_blocking=True)
        if not self.on_cpu:
            torch.cuda.synchronize(self.device)  # the copies are done when the swap is counted
        self.on_device = True

    def to_home(self) -> None:
        """Off the device: the device copy is dropped (the home copy stays); tensors that have
        none (mutable, or made after the home) go to host memory."""
        import torch

        if not self.on_device:
            return
        with torch.no_grad():
            for name, tensor in self.tensors():
                if name in self._host:
                    tensor.data = self._host[name]
                elif name in self._spilled:
                    tensor.data = torch.empty(0, dtype=tensor.dtype)  # freed; read back at to_device
                else:
                    self._away[name] = tensor.data.to("cpu")
                    tensor.data = torch.empty(0, dtype=tensor.dtype)
        self.on_device = False

    def close(self) -> None:
        """Remove the spill file (the worker is ending)."""
        self.spill_file.unlink(missing_ok=True)


def _pinned(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """A page-locked copy (one DMA to the GPU); the plain copy where pinning is refused (a tensor
    subclass, or the operating system's locked-memory limit)."""
    try:
        return tensor.pin_memory()
    except Exception as exc:
        logger.warning("variant %s: pinning host memory failed (%s); using pageable memory", name, exc)
        return tensor
