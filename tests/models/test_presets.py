"""Acceleration presets on the tiny model, on the CPU (real diffusers pipelines, real torchao)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models.presets.apply import PresetManager
from models.presets.policy import (
    PRESETS,
    CacheSetting,
    Hardware,
    Preset,
    adapt_to_hardware,
    default_presets,
    default_warmup_sizes,
    nearest_enabled,
)

CPU = Hardware("cpu", None, torchao=True, compiler=True)

# The tiny model's first-block residual changes by 0.24-0.6 per step, so the shipped threshold
# (0.12) never skips on it; 0.5 gives a known skip pattern (cpu-code-paths.md).
TINY_PRESETS = {**PRESETS, "high": replace(PRESETS["high"], cache=CacheSetting("first_block", 0.5))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the managers keep their compile cache: shared by this module's tests."""
    return tmp_path_factory.mktemp("presets-data")


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir  # the session's tiny model (tests/conftest.py)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def block_bodies(pipe) -> list[int]:
    """Counts block bodies that really computed: a hook on a leaf inside every block (a hook on
    the block itself still fires when the cache short-circuits it). Registered before the
    manager copies and compiles the transformer, so every weight set and graph carries it."""
    calls = [0]

    @torch.compiler.disable
    def count(*_args) -> None:
        calls[0] += 1

    for block in [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]:
        block.attn.norm_q.register_forward_hook(count)
    return calls


@pytest.fixture(scope="module")
def manager(pipe, block_bodies, data_dir: Path) -> PresetManager:
    torch._dynamo.reset()
    # backend="eager" exercises the compile plumbing in seconds; one test below uses inductor.
    return PresetManager(
        pipe.transformer,
        device="cpu",
        enabled=["none", "regular", "high"],
        data_dir=data_dir,
        presets=TINY_PRESETS,
        compile_backend="eager",
        # int8 on any CPU: the tiny model's int8 matmuls are small, even without VNNI/AMX.
        hardware=CPU,
    )


def generate(pipe, size: tuple[int, int] = (64, 64), steps: int = 2, output_type: str = "pt"):
    return pipe(
        prompt="a red chair",
        width=size[0],
        height=size[1],
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type=output_type,
    ).images


# ---------------------------------------------------------------------- definitions and fallback


def test_default_mapping() -> None:
    assert PRESETS["none"] == Preset("none")  # loaded precision, eager, no cache: the reference
    regular, high = PRESETS["regular"], PRESETS["high"]
    assert (regular.precision, regular.compile, regular.fuse_qkv, regular.cache) == (
        "fp8",
        "regional",
        True,
        None,
    )
    assert replace(high, name="regular", cache=None) == regular
    assert high.cache is not None and 0.08 <= high.cache.threshold <= 0.12
    with pytest.raises(AttributeError):
        regular.precision = "int8"  # frozen


def test_fp8_falls_back_by_hardware() -> None:
    fp8 = PRESETS["regular"]
    on_cpu, note = adapt_to_hardware(fp8, CPU)
    assert on_cpu.precision == "int8"
    assert note == (
        "fp8 dynamic needs an NVIDIA GPU with compute capability 8.9+ (this device: CPU); "
        "ran int8 dynamic instead"
    )
    h100 = Hardware("cuda", (9, 0), torchao=True, compiler=True)
    assert adapt_to_hardware(fp8, h100) == (fp8, None)
    a100, note = adapt_to_hardware(fp8, Hardware("cuda", (8, 0), torchao=True, compiler=True))
    assert a100.precision == "int8" and "compute capability 8.0" in note
    bare, note = adapt_to_hardware(fp8, Hardware("cpu", None, torchao=False, compiler=False))
    assert (bare.precision, bare.compile) == ("bf16", "none")
    assert "torchao, which is not installed" in note and "needs a C++ compiler" in note
    # An AVX2 CPU: no int8 matrix units, so int8 would crawl; the loaded precision runs instead.
    avx2, note = adapt_to_hardware(fp8, Hardware("cpu", None, torchao=True, compiler=True, int8_matmul=False))
    assert avx2.precision == "bf16" and note == (
        "fp8 dynamic needs an NVIDIA GPU with compute capability 8.9+ (this device: CPU); "
        "int8 dynamic needs int8 matrix units (AVX512-VNNI or AMX on a CPU), which this CPU lacks; "
        "ran the loaded precision instead"
    )


def test_nearest_enabled_preset() -> None:
    assert nearest_enabled("high", ["none", "regular"]) == "regular"
    assert nearest_enabled("none", ["regular", "high"]) == "regular"
    assert nearest_enabled("regular", ["none", "high"]) == "none"  # ties go to the slower one
    assert nearest_enabled("turbo", ["high"]) == "high"


def test_disabled_preset_runs_the_nearest_and_says_so(pipe, data_dir: Path) -> None:
    only_none = PresetManager(
        pipe.transformer, device="cpu", enabled=["none"], data_dir=data_dir, hardware=CPU
    )
    with only_none.use(pipe, "high") as active:
        assert pipe.transformer is only_none.base
        generate(pipe)
    assert active.name == "none" and active.requested == "high"
    assert active.note == "preset 'high' is not enabled on this server (enabled: none); ran 'none'"
    with pytest.raises(ValueError, match="unknown or no presets"):
        PresetManager(pipe.transformer, device="cpu", enabled=["turbo"], data_dir=data_dir)


# ---------------------------------------------------------------------- end to end


def test_each_preset_runs_end_to_end_and_reports_what_ran(pipe, manager) -> None:
    base = pipe.transformer
    images = {}
    for name in ("none", "regular", "high"):
        with manager.use(pipe, name) as active:
            ran_with = pipe.transformer
            images[name] = generate(pipe, steps=3)
        assert pipe.transformer is base  # restored
        assert active.name == name
        images[name + "_transformer"] = ran_with
    assert images["none_transformer"] is base
    assert images["regular_transformer"] is images["high_transformer"] is not base  # one weight set
    assert manager.runnable["regular"][0].precision == "int8"
    assert "compute capability 8.9+" in active.note and "int8 dynamic" in active.note

    # int8 weights live only in the variant; the base keeps plain float weights.
    variant_linear = images["regular_transformer"].single_transformer_blocks[0].proj_mlp
    assert "Int8" in type(variant_linear.weight).__name__
    assert type(base.single_transformer_blocks[0].proj_mlp.weight) is torch.nn.Parameter
    assert images["regular_transformer"].transformer_blocks[0].attn.fused_projections
    assert not base.transformer_blocks[0].attn.fused_projections

    # Quantized output stays close to the reference; all outputs are real images.
    reference = images["none"]
    assert reference.shape == (1, 3, 64, 64) and torch.isfinite(images["regular"]).all()
    rel = float((images["regular"] - reference).norm() / reference.norm())
    assert 0 < rel < 0.2


def test_cache_preset_skips_transformer_work(pipe, manager, block_bodies) -> None:
    steps = 6
    done = {}
    for name in ("regular", "high", "regular"):  # the cache is off again after the call
        with manager.use(pipe, name):
            before = block_bodies[0]
            generate(pipe, steps=steps)
        done.setdefault(name, []).append(block_bodies[0] - before)
    assert done["regular"] == [3 * steps, 3 * steps]  # 1 double + 2 single blocks every step
    assert done["high"][0] <= 0.6 * 3 * steps  # threshold 0.5: [3, 1, 1, 1, 3, 1] on this model


def test_magcache_skips_on_a_fixed_schedule_whatever_the_activations(pipe, block_bodies, data_dir) -> None:
    # The benchmark's `high` for random weights: MagCache with FLUX.1 [dev]'s ratios decides
    # from the step count alone, so two different prompts and seeds skip the very same steps.
    fixed = {"none": PRESETS["none"], "high": Preset("high", cache=CacheSetting("mag", 0.06))}
    manager = PresetManager(
        pipe.transformer,
        device="cpu",
        enabled=["none", "high"],
        data_dir=data_dir,
        presets=fixed,
        hardware=CPU,
    )
    steps, work = 10, []
    for prompt, seed in (("a red chair", 0), ("a blue dog on the moon", 7)):
        with manager.use(pipe, "high", steps=steps) as active:
            before = block_bodies[0]
            pipe(
                prompt=prompt,
                width=64,
                height=64,
                num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="latent",
            )
            work.append(block_bodies[0] - before)
    assert "MagCache" in active.preset.describe()
    assert work[0] == work[1] < 3 * steps  # some steps skipped, the same ones both times


def test_img2img_pipeline_sharing_components(pipe, manager) -> None:
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    img2img = FluxImg2ImgPipeline.from_pipe(pipe)
    with manager.use(img2img, "regular") as active:
        assert img2img.transformer is not manager.base and pipe.transformer is manager.base
        out = img2img(
            prompt="a chair",
            image=Image.new("RGB", (64, 64), "red"),
            width=64,
            height=64,
            strength=0.6,
            num_inference_steps=3,
            generator=torch.Generator("cpu").manual_seed(0),
        ).images[0]
    assert active.name == "regular" and out.size == (64, 64)
    assert img2img.transformer is manager.base


def test_configured_sizes_do_not_recompile(tiny_dir: Path, data_dir: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled_only = {
        "none": PRESETS["none"],
        "regular": Preset("regular", compile="regional"),
        "high": Preset("high", compile="regional", cache=CacheSetting("first_block", 0.5)),
    }
    manager = PresetManager(
        pipe.transformer,
        device="cpu",
        enabled=["regular", "high"],
        data_dir=data_dir,
        presets=compiled_only,
        compile_backend=counter,
    )
    sizes = [(64, 64), (96, 64), (64, 128)]
    seconds = manager.warmup(pipe, sizes[:1], steps=1)
    assert set(seconds) == {"regular", "high"} and all(s > 0 for s in seconds.values())
    after_first_size = counter.frame_count
    assert after_first_size >= 2  # the double and the single block each got a graph

    manager.warmup(pipe, sizes, steps=1)
    for size in reversed(sizes):
        for name in ("regular", "high"):
            with manager.use(pipe, name):
                generate(pipe, size=size)
    assert counter.frame_count == after_first_size


@pytest.mark.slow
def test_regional_compile_with_inductor(tiny_dir: Path, data_dir: Path) -> None:
    """The one real inductor compile (30-40 s on 2 idle cores; seconds with a warm inductor
    compile cache). int8 under inductor takes minutes on 2 cores, so this runs the
    regional compile and fused QKV of `regular` at the loaded precision."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir)
    torch._dynamo.reset()
    presets = {"none": PRESETS["none"], "regular": replace(PRESETS["regular"], precision="bf16")}
    manager = PresetManager(
        pipe.transformer, device="cpu", enabled=["none", "regular"], data_dir=data_dir, presets=presets
    )
    assert manager.compile_cache_dir == Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    seconds = manager.warmup(pipe, [(64, 64)], steps=1)
    with manager.use(pipe, "none"):
        reference = generate(pipe)
    with manager.use(pipe, "regular") as active:
        compiled = generate(pipe)
    assert active.note is None and active.preset.compile == "regional"
    assert seconds["regular"] > seconds["none"]  # the compile happened during warm-up
    assert float((compiled - reference).norm() / reference.norm()) < 1e-4
    assert any(manager.compile_cache_dir.iterdir())


def test_device_defaults_keep_minutes_of_compile_off_the_cpu() -> None:
    assert default_presets("cuda") == ["none", "regular", "high"]
    assert default_presets("cpu") == ["none"]
    assert default_warmup_sizes("cuda") == [(1024, 768), (1024, 1024)]
    assert default_warmup_sizes("cpu") == []
