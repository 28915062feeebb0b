"""Memory plans: selection from VRAM figures, and what can be applied on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.memory import (
    PLANS,
    GiB,
    apply_plan,
    choose_plan,
    enable_vae_tiling_if_large,
    expected_peak_bytes,
    offload_text_encoders_after_encoding,
)


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # the session's tiny model (tests/conftest.py)


ADA, HOPPER, AMPERE, AMPERE_CONSUMER = (8, 9), (9, 0), (8, 0), (8, 6)


@pytest.mark.parametrize(
    ("card", "vram_gib", "capability", "plan"),
    [
        # The table in docs/benchmarks.md ("Memory plans"): card, memory as CUDA reports it.
        ("H100 80 GB", 79.1, HOPPER, "resident"),
        ("H200", 139.8, HOPPER, "resident"),
        ("A100 80 GB", 79.1, AMPERE, "resident"),
        ("70 GiB", 70.0, HOPPER, "resident"),
        ("69.9 GiB", 69.9, HOPPER, "fp8-offload-text"),
        ("L40S 48 GB", 44.4, ADA, "fp8-offload-text"),
        ("RTX 6000 Ada 48 GB", 47.5, ADA, "fp8-offload-text"),
        ("RTX 4090 24 GB", 23.6, ADA, "fp8-offload-text"),
        ("RTX 5090 32 GB", 31.4, (12, 0), "fp8-offload-text"),
        ("A6000 48 GB", 47.5, AMPERE_CONSUMER, "fp8-storage-offload-text"),
        ("A100 40 GB", 39.4, AMPERE, "fp8-storage-offload-text"),
        ("RTX 3090 24 GB", 23.6, AMPERE_CONSUMER, "fp8-storage-offload-text"),
        ("21.9 GiB", 21.9, ADA, "model-offload"),
        ("RTX 4080 16 GB", 15.7, ADA, "model-offload"),
        ("15.4 GiB", 15.4, ADA, "sequential-offload"),
        ("RTX 4070 12 GB", 11.7, ADA, "sequential-offload"),
        ("RTX 3070 8 GB", 7.8, AMPERE_CONSUMER, "sequential-offload"),
    ],
)
def test_plan_follows_card_memory_and_capability(
    card: str, vram_gib: float, capability: tuple[int, int], plan: str
) -> None:
    assert choose_plan(int(vram_gib * GiB), capability=capability).name == plan, card


def test_fp8_compute_needs_torchao_and_a_capability() -> None:
    l40s = int(44.4 * GiB)
    assert choose_plan(l40s, capability=ADA, torchao=False).name == "fp8-storage-offload-text"
    assert choose_plan(l40s).name == "fp8-storage-offload-text"  # capability unknown


def test_cpu_forced_and_unknown_plans() -> None:
    assert choose_plan(None).name == "resident"
    assert choose_plan(80 * GiB, forced="sequential-offload").name == "sequential-offload"
    with pytest.raises(ValueError, match="unknown memory plan 'tiny'"):
        choose_plan(None, forced="tiny")


def test_only_the_resident_plan_keeps_several_weight_sets() -> None:
    assert [name for name, plan in PLANS.items() if not plan.single_weight_set] == ["resident"]
    assert PLANS["fp8-offload-text"].base_precision == "fp8"
    assert {plan.base_precision for name, plan in PLANS.items() if name != "fp8-offload-text"} == {"bf16"}


# The expected peaks (1024x1024, one image), GiB, as docs/benchmarks.md lists them.
DOCUMENTED_PEAKS = {
    "resident": 45.4,  # with the fp8 copy `regular` runs on beside the bf16 weights
    "fp8-offload-text": 20.4,
    "fp8-storage-offload-text": 21.1,
    "model-offload": 14.3,
    "sequential-offload": 3.1,
}


def test_expected_peaks_are_computed_and_fit_the_cards_each_plan_is_chosen_for() -> None:
    peaks = {name: round(plan.expected_peak_gib, 1) for name, plan in PLANS.items()}
    assert peaks == DOCUMENTED_PEAKS
    # CUDA's context (~0.3-0.5 GiB) is not in the peak: the smallest card a plan is chosen
    # for holds its peak and that.
    for name, plan in PLANS.items():
        if plan.min_vram_gib:
            assert plan.expected_peak_gib + 0.5 <= plan.min_vram_gib, name
    # On 24 GB cards T5's visit (~8.9 GiB) is the peak at one image of any size up to 1024x1024;
    # four images' activations go beyond it.
    fp8 = PLANS["fp8-offload-text"]
    assert expected_peak_bytes(fp8) == expected_peak_bytes(fp8, width=512, height=512)
    assert expected_peak_bytes(fp8, images=4) > expected_peak_bytes(fp8)


def test_fp8_compute_plan_without_fp8_units_falls_back_to_fp8_storage(
    tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a CPU torchao refuses float8 dynamic quantization (it needs capability 8.9+): the
    plan becomes its fp8-storage form, and the log says why."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    with caplog.at_level("WARNING", logger="models.memory"):
        applied = apply_plan(pipe, PLANS["fp8-offload-text"], "cpu")
    assert applied.name == "fp8-storage-offload-text"
    assert "fp8 quantization failed" in caplog.text and "fp8-storage-offload-text" in caplog.text
    assert pipe.transformer.single_transformer_blocks[0].proj_mlp.weight.dtype == torch.float8_e4m3fn


def test_fp8_storage_plan_runs_on_cpu(tiny_dir: Path) -> None:
    """fp8 storage keeps the blocks' linear weights in fp8 between calls and computes in the
    loaded dtype; norms, biases and the layers outside the blocks keep the loaded dtype."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    reference = pipe("a cat", width=64, height=64, num_inference_steps=2, output_type="pt").images
    assert apply_plan(pipe, PLANS["fp8-storage-offload-text"], "cpu").name == "fp8-storage-offload-text"
    block = pipe.transformer.single_transformer_blocks[0]
    seen: list[torch.dtype] = []
    block.proj_mlp.register_forward_pre_hook(lambda module, _args: seen.append(module.weight.dtype))
    assert block.proj_mlp.weight.dtype == torch.float8_e4m3fn
    assert block.proj_mlp.bias.dtype == torch.float32 and block.norm.linear.weight.dtype == torch.float32
    assert pipe.transformer.proj_out.weight.dtype == torch.float32
    out = pipe("a cat", width=64, height=64, num_inference_steps=2, output_type="pt").images
    assert seen and set(seen) == {torch.float32}  # computed in the loaded dtype
    assert block.proj_mlp.weight.dtype == torch.float8_e4m3fn  # stored in fp8 again
    assert pipe.transformer.dtype == torch.float32
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = float((out - reference).norm() / reference.norm())
    assert 0 < rel < 1  # fp8 storage of a random tiny model: changed, still the same picture scale


def test_text_encoders_leave_before_the_transformer_runs(tiny_dir: Path) -> None:
    """The hook chain of the fp8-offload-text plan: CLIP -> T5 -> (T5 offloaded) -> transformer.

    accelerate skips offloading a module that is already on the CPU, so on a CPU only our
    transformer pre-hook's offload of T5 is observable; CLIP's is wired through the chain."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    clip_hook, t5_hook = offload_text_encoders_after_encoding(pipe, "cpu")
    assert t5_hook.hook.prev_module_hook is clip_hook  # T5 running offloads CLIP (on a GPU)

    events: list[str] = []
    pipe.text_encoder.register_forward_pre_hook(lambda *_: events.append("clip"))
    pipe.text_encoder_2.register_forward_pre_hook(lambda *_: events.append("t5"))
    pipe.transformer.register_forward_pre_hook(lambda *_: events.append("transformer"))
    original = t5_hook.offload

    def offload_t5() -> None:
        events.append("t5 offloaded")
        original()

    t5_hook.offload = offload_t5
    pipe("a cat", width=64, height=64, num_inference_steps=2, output_type="latent")
    assert events[:4] == ["clip", "t5", "t5 offloaded", "transformer"]


def test_vae_tiling_only_for_large_images(tiny_dir: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    plan = PLANS["resident"]
    assert enable_vae_tiling_if_large(vae, 2048, 2048, plan) and vae.use_tiling
    assert not enable_vae_tiling_if_large(vae, 1024, 1024, plan) and not vae.use_tiling
