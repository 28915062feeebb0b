"""The residency manager on real tiny transformers (models/residency.py, the moves of
models/variants/placement.py): least recently used out, pins, never a running variant, a budget
that can never hold a variant, homes on disk when host memory is short; and compiled regional
presets that survive a variant leaving and coming back (CompileCounter: dynamo traces, the
graphs run eagerly)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from torch._dynamo.testing import CompileCounter

from models.presets.apply import PresetManager
from models.presets.policy import Hardware, Preset
from models.residency import Residency, ResidencyError
from models.variants.placement import TransformerWeights
from models.variants.tiny import ensure_tiny_variants
from tests.support import wait_until

KINDS = ("krea", "kontext", "finetune")


@pytest.fixture(scope="module")
def variants_dir(tiny_model_dir: Path) -> Path:
    return ensure_tiny_variants(tiny_model_dir.parent)


def load(variants_dir: Path, kind: str) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(variants_dir / kind, local_files_only=True).eval()


def forward(transformer: FluxTransformer2DModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
    }
    with torch.no_grad():
        return transformer(
            **inputs,
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
        ).sample


def weights(variants_dir: Path, tmp_path: Path) -> dict[str, TransformerWeights]:
    modules = {kind: load(variants_dir, kind) for kind in KINDS}
    return {
        kind: TransformerWeights(kind, modules=lambda m=module: [m], device="cpu", spill_dir=tmp_path)
        for kind, module in modules.items()
    }


def manager(variants_dir: Path, tmp_path: Path, *, holds: float, **kwargs) -> Residency:
    held = weights(variants_dir, tmp_path)
    size = next(iter(held.values())).nbytes()
    return Residency(held, budget_bytes=int(size * holds), **kwargs)  # type: ignore[arg-type]


def test_the_least_recently_used_leaves_first(variants_dir: Path, tmp_path: Path) -> None:
    residency = manager(variants_dir, tmp_path, holds=2)
    assert residency.on_device() == ["krea", "kontext"]  # placed in order while they fit
    with residency.use("kontext"):
        pass
    with residency.use("krea"):
        pass
    with residency.use("finetune") as swap:
        assert swap is not None and swap.evicted == ("kontext",) and swap.source == "host"
    assert residency.on_device() == ["krea", "finetune"]
    assert (residency.stats.swaps, residency.stats.evictions) == (1, 1)


def test_a_pinned_variant_never_leaves(variants_dir: Path, tmp_path: Path) -> None:
    residency = manager(variants_dir, tmp_path, holds=2, pinned={"finetune"})
    assert residency.on_device()[0] == "finetune"  # pinned ones are placed first
    for name in ("krea", "kontext", "krea", "kontext"):
        with residency.use(name):
            assert "finetune" in residency.on_device()
    assert residency.stats.swaps >= 3
    assert "finetune (pinned)" in residency.describe()


def test_a_running_variant_is_never_evicted(variants_dir: Path, tmp_path: Path) -> None:
    residency = manager(variants_dir, tmp_path, holds=1)
    running, release, took_over = threading.Event(), threading.Event(), threading.Event()

    def job(name: str, started: threading.Event, wait: threading.Event | None = None) -> None:
        with residency.use(name):
            started.set()
            if wait is not None:
                wait.wait(30)

    first = threading.Thread(target=job, args=("krea", running, release))
    first.start()
    running.wait(30)
    second = threading.Thread(target=job, args=("kontext", took_over))
    second.start()
    second.join(0.5)  # it waits for the running job, however long that takes
    assert not took_over.is_set() and residency.on_device() == ["krea"]
    release.set()
    wait_until(took_over.is_set, timeout=30)
    first.join(30)
    second.join(30)
    assert residency.on_device() == ["kontext"] and residency.stats.swaps == 1


def test_a_budget_that_can_never_hold_the_variant_says_so(variants_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ResidencyError, match=r"the pinned variants .* need .* more than its budget"):
        manager(variants_dir, tmp_path, holds=1.5, pinned={"krea", "kontext"})
    residency = manager(variants_dir, tmp_path, holds=1.5, pinned={"krea"})
    with (
        pytest.raises(ResidencyError, match=r"variant 'kontext' needs .* exceeds the budget"),
        residency.use("kontext"),
    ):
        pass


def test_without_host_room_a_variant_is_read_back_from_disk(variants_dir: Path, tmp_path: Path) -> None:
    expected = {kind: forward(load(variants_dir, kind)) for kind in ("krea", "kontext")}
    held = weights(variants_dir, tmp_path)
    del held["finetune"]
    size = held["krea"].nbytes()
    residency = Residency(held, budget_bytes=size, host_budget_bytes=size)  # type: ignore[arg-type]
    assert (held["krea"].home, held["kontext"].home) == ("host", "disk")
    module = {kind: w.modules()[0] for kind, w in held.items()}
    assert module["kontext"].x_embedder.weight.numel() == 0  # its tensors are freed
    for kind in ("kontext", "krea", "kontext"):
        with residency.use(kind):
            assert torch.equal(forward(module[kind]), expected[kind])
    assert residency.stats.by_source == {"disk": 2, "host": 1}


def test_compiled_presets_survive_a_variant_leaving(
    variants_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Regional compile of one variant serves the other (same block classes, parameters as
    graph inputs), and neither compiles again after a swap, through the disk home."""
    counter = CompileCounter()
    regional = {"compiled": Preset("compiled", compile="regional")}
    cpu = Hardware("cpu", None, torchao=False, compiler=True)
    pipes, managers = {}, {}
    for kind in ("krea", "kontext"):
        pipes[kind] = FluxPipeline.from_pretrained(tiny_model_dir, transformer=load(variants_dir, kind))
        pipes[kind].set_progress_bar_config(disable=True)
        managers[kind] = PresetManager(
            pipes[kind].transformer,
            device="cpu",
            enabled=["compiled"],
            data_dir=tmp_path,
            presets=regional,
            compile_backend=counter,
            hardware=cpu,
        )
    held = {
        kind: TransformerWeights(kind, modules=managers[kind].weight_sets, device="cpu", spill_dir=tmp_path)
        for kind in managers
    }
    residency = Residency(held, budget_bytes=held["krea"].nbytes(), host_budget_bytes=0)  # type: ignore[arg-type]

    def run(kind: str) -> torch.Tensor:
        with residency.use(kind), managers[kind].use(pipes[kind], "compiled", steps=1):
            return pipes[kind](
                prompt="a red chair",
                width=64,
                height=64,
                num_inference_steps=1,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
            ).images

    first = run("krea")
    compiled = counter.frame_count
    assert compiled > 0
    other = run("kontext")
    again = run("krea")
    assert counter.frame_count == compiled  # nothing compiled for the second variant or after swaps
    assert torch.equal(again, first) and not torch.equal(other, first)
    assert residency.stats.swaps == 2
