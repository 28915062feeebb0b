"""flux-fast's tuning pieces (models/presets/tuning.py, policy.py's TUNING) on the tiny model, on
the CPU: each piece's code path, and its fallback with a note where the machine cannot run it.
Compiles go through backend "eager" (or a recording stand-in for inductor's compile_fx), so no
test here builds a kernel; whether a piece is fast is the GPU bench's to say."""

from __future__ import annotations

import io
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from pydantic import ValidationError

from models.loading import load_runtime
from models.memory import PLANS
from models.presets.apply import PresetManager
from models.presets.policy import (
    PRESETS,
    TUNED_INDUCTOR_FLAGS,
    TUNING,
    Hardware,
    Preset,
    adapt_to_hardware,
    tuned_presets,
    with_tuning,
)
from models.request import GenerationRequest
from models.runtime import FluxRuntime, Generation
from server.config import Settings, TuningPiece
from server.supervisor.cli import build_parser, settings_from_args

CPU = Hardware("cpu", None, torchao=True, compiler=True)
HOPPER = Hardware("cuda", (9, 0), torchao=True, compiler=True)  # stood in: the tensors stay on the CPU
ADA = Hardware("cuda", (8, 9), torchao=True, compiler=True)
COMPILED = Preset("regular", compile="regional")


# ------------------------------------------------------------------------- policy (no torch)


def test_shipped_presets_have_no_tuning_and_an_operator_names_the_pieces() -> None:
    assert all(preset.tuning == [] for preset in PRESETS.values())  # off until a GPU measures them
    assert typing.get_args(TuningPiece) == tuple(TUNING)  # the setting knows the same names

    tuned = tuned_presets(["inductor-flags", "compiled-vae"])
    assert tuned["none"] == PRESETS["none"]  # the plain diffusers reference stays plain
    for name in ("regular", "high"):
        assert tuned[name].tuning == ["inductor flags", "compiled VAE decode"]
        assert tuned[name].describe().endswith("inductor flags, compiled VAE decode")
    with pytest.raises(ValueError, match="unknown tuning piece 'warp-drive'"):
        with_tuning(PRESETS["regular"], ["warp-drive"])

    assert Settings(preset_tuning="fa3, cuda-graphs").preset_tuning == ["fa3", "cuda-graphs"]
    assert Settings(preset_tuning="fa3,cuda-graphs").to_env()["FLUX_PRESET_TUNING"] == "fa3,cuda-graphs"
    with pytest.raises(ValidationError):
        Settings(preset_tuning="warp-drive")
    flags = build_parser().parse_args(["serve", "--preset-tuning", "inductor-flags,compiled-vae"])
    assert settings_from_args(flags).preset_tuning == ["inductor-flags", "compiled-vae"]


def test_inductor_options_carry_the_flags_autotune_and_cuda_graphs() -> None:
    preset = with_tuning(COMPILED, ["inductor-flags", "max-autotune", "cuda-graphs"])
    options = preset.inductor_options()
    assert options == {**TUNED_INDUCTOR_FLAGS, "max_autotune": True, "triton.cudagraphs": True}
    assert options["epilogue_fusion"] is False and options["conv_1x1_as_mm"] is True
    assert "triton.cudagraphs" not in preset.inductor_options(for_vae=True)
    assert COMPILED.inductor_options() == {}


@pytest.mark.parametrize(
    ("pieces", "hardware", "weights_move", "kept", "note"),
    [
        (["fa3"], HOPPER, False, ["FlashAttention-3"], None),
        (
            ["fa3"],
            ADA,
            False,
            [],
            "FlashAttention-3 needs a Hopper GPU (compute capability 9.x; this device: CUDA",
        ),
        (
            ["fa3"],
            CPU,
            False,
            [],
            "FlashAttention-3 needs a Hopper GPU (compute capability 9.x; this device: CPU)",
        ),
        (["cudnn-attention"], CPU, False, [], "attention backend '_native_cudnn' needs a CUDA device"),
        (["cuda-graphs"], HOPPER, False, ["CUDA graphs"], None),
        (["cuda-graphs"], CPU, False, [], "CUDA graphs need a CUDA device (this device: CPU); ran without"),
        (["cuda-graphs"], HOPPER, True, [], "CUDA graphs need the transformer's weights to stay in place"),
        (["inductor-flags", "static-shapes", "compiled-vae"], CPU, False, None, None),
    ],
)
def test_a_piece_the_machine_cannot_run_is_left_out_and_the_note_says_why(
    pieces: list[str], hardware: Hardware, weights_move: bool, kept: list[str] | None, note: str | None
) -> None:
    preset = with_tuning(COMPILED, pieces)
    adapted, why = adapt_to_hardware(preset, hardware, weights_move=weights_move)
    assert adapted.tuning == (preset.tuning if kept is None else kept)
    assert why == note or (note is not None and why is not None and why.startswith(note))


def test_without_a_compile_the_compiled_pieces_go_too() -> None:
    no_compiler = Hardware("cpu", None, torchao=True, compiler=False)
    preset = with_tuning(COMPILED, ["inductor-flags", "compiled-vae", "static-shapes", "max-autotune"])
    adapted, why = adapt_to_hardware(preset, no_compiler)
    assert adapted == Preset("regular") and why is not None and why.endswith("ran eager")
    assert preset.eager() == Preset("regular", compile_vae=True)  # the VAE's compile is its own


# ------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path) -> FluxRuntime:
    return load_runtime("tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",))


def use_presets(
    runtime: FluxRuntime, presets: dict[str, Preset], backend: Any = "eager", hardware: Hardware = CPU
) -> PresetManager:
    """The runtime's presets replaced by `presets` (plus `none`), compiled through `backend`."""
    torch._dynamo.reset()
    runtime.presets = PresetManager(
        runtime.pipe.transformer,
        device="cpu",
        enabled=["none", *presets],
        data_dir=runtime.presets.compile_cache_dir,
        presets={"none": PRESETS["none"], **presets},
        compile_backend=backend,
        hardware=hardware,
    )
    return runtime.presets


def generate(
    runtime: FluxRuntime, acceleration: str = "regular", size: tuple[int, int] = (64, 64)
) -> Generation:
    width, height = size
    request = GenerationRequest(
        prompt="a red cat", width=width, height=height, steps=2, seed=7, acceleration=acceleration
    )
    return runtime.generate(request)


def png(out: Generation) -> bytes:
    buffer = io.BytesIO()
    out.images[0].save(buffer, format="PNG")
    return buffer.getvalue()


def blocks(runtime: FluxRuntime) -> int:
    transformer = runtime.pipe.transformer
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


@pytest.fixture
def math_attention_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of diffusers' `_native_math` attention backend. Inside a compiled block too:
    dynamo traces the count into the graph and replays the list's mutation at every call."""
    calls = [0]
    real = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, counted)
    return calls


def test_an_attention_backend_runs_in_every_block_for_its_preset_only(
    runtime: FluxRuntime, math_attention_calls: list[int]
) -> None:
    tuned = Preset("regular", compile="regional", attention="_native_math")
    use_presets(runtime, {"regular": tuned, "high": Preset("high", compile="regional")})
    plain = generate(runtime, "high")
    assert math_attention_calls[0] == 0

    out = generate(runtime, "regular")
    assert out.preset_note is None and out.preset == "regular"
    assert math_attention_calls[0] == blocks(runtime) * 2  # every block, both steps, compiled
    processors = [m.processor for m in runtime.pipe.transformer.modules() if hasattr(m, "processor")]
    assert all("_attention_backend" not in p.__dict__ for p in processors)  # restored afterwards

    # `high` shares the same compiled blocks: their guard on the backend sends it to SDPA again.
    again = generate(runtime, "high")
    assert math_attention_calls[0] == blocks(runtime) * 2
    assert png(again) == png(plain)


def test_flash_attention_3_falls_back_with_a_note_where_it_cannot_run(
    runtime: FluxRuntime, math_attention_calls: list[int]
) -> None:
    fa3 = with_tuning(Preset("regular"), ["fa3"])
    use_presets(runtime, {"regular": fa3})
    reference = png(generate(runtime, "none"))
    out = generate(runtime, "regular")
    assert out.preset_note == (
        "FlashAttention-3 needs a Hopper GPU (compute capability 9.x; this device: CPU); "
        "ran the default attention (PyTorch SDPA)"
    )
    assert png(out) == reference

    # On a Hopper GPU without the flash_attn_3 package: diffusers' own words, and SDPA again.
    use_presets(runtime, {"regular": fa3}, hardware=HOPPER)
    out = generate(runtime, "regular")
    assert out.preset_note == (
        "Flash Attention 3 backend '_flash_3' is not usable because of missing package or the version "
        "is too old. Please build FA3 beta release from source; ran the default attention (PyTorch SDPA)"
    )
    assert png(out) == reference


class RecordedInductor:
    """Stands in for inductor's compile_fx (no kernel is built on the CPU): records the config
    patches torch.compile passes to each compile and the process-wide config at that moment,
    and runs the graph as captured."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.global_epilogue_fusion: list[bool] = []

    def __call__(self, gm: torch.fx.GraphModule, _inputs: Any, config_patches: Any = None, **_: Any) -> Any:
        import torch._inductor.config as inductor_config

        self.patches.append(dict(config_patches or {}))
        self.global_epilogue_fusion.append(inductor_config.epilogue_fusion)
        return gm.forward


def test_inductor_flags_and_cuda_graphs_are_set_inside_the_compile_only(
    runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor.compile_fx
    import torch._inductor.config as inductor_config
    from torch._inductor.cudagraph_trees import MarkStepBox

    inductor = RecordedInductor()
    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", inductor)
    tuned = with_tuning(Preset("regular", compile="regional"), ["inductor-flags", "cuda-graphs"])
    use_presets(runtime, {"regular": tuned}, backend="inductor", hardware=HOPPER)

    marks = MarkStepBox.mark_step_counter
    flags_during_steps: list[bool] = []
    original_pipe_call = type(runtime.pipe).__call__

    def pipe_call(pipe: Any, *args: Any, **kwargs: Any) -> Any:
        def step_end(pipeline: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            flags_during_steps.append(inductor_config.epilogue_fusion)
            return kwargs["callback_on_step_end"](pipeline, i, t, tensors)

        return original_pipe_call(pipe, *args, **{**kwargs, "callback_on_step_end": step_end})

    monkeypatch.setattr(type(runtime.pipe), "__call__", pipe_call)
    out = generate(runtime, "regular")
    assert out.preset_note is None  # Hopper stood in: CUDA graphs are on
    assert inductor.patches, "nothing was compiled through inductor"
    for patches in inductor.patches:  # every compile of the blocks got the flags and CUDA graphs
        assert patches == {**TUNED_INDUCTOR_FLAGS, "triton.cudagraphs": True}
    # The process-wide config never changed: not while compiling, not between the steps.
    assert inductor.global_epilogue_fusion == [True] * len(inductor.patches)
    assert flags_during_steps == [True, True] and inductor_config.epilogue_fusion is True
    # One CUDA graph generation per transformer call (2 steps), and the marker is gone after.
    assert MarkStepBox.mark_step_counter == marks - 2
    monkeypatch.undo()
    generate(runtime, "none")
    assert MarkStepBox.mark_step_counter == marks - 2


def test_cuda_graphs_are_refused_on_a_cpu_and_every_response_says_so(runtime: FluxRuntime) -> None:
    manager = use_presets(runtime, {"regular": with_tuning(COMPILED, ["cuda-graphs"])})
    for _ in range(2):
        with manager.use(runtime.pipe, "regular") as active:
            assert active.preset is not None and not active.preset.cuda_graphs
            assert active.note == "CUDA graphs need a CUDA device (this device: CPU); ran without"
            assert not runtime.pipe.transformer._forward_pre_hooks  # no CUDA graph step marker


def recording_backend(graphs: list[str]) -> Any:
    def backend(gm: torch.fx.GraphModule, _inputs: Any) -> Any:
        graphs.append(gm.code)
        return gm.forward

    return backend


COMPILED_VAE = Preset("regular", compile_vae=True)  # the transformer eager: only the decoder compiles


def test_a_compiled_vae_decode_makes_the_same_image_and_warm_up_compiles_it(runtime: FluxRuntime) -> None:
    graphs: list[str] = []
    use_presets(runtime, {"regular": COMPILED_VAE}, recording_backend(graphs))
    reference = png(generate(runtime, "none"))
    runtime.warmup([(64, 64)], max_images=1)
    assert [code for code in graphs if "conv2d" in code]  # the decoder was compiled at warm-up
    out = generate(runtime, "regular")
    assert out.preset_note is None and out.preset == "regular"
    assert png(out) == reference
    assert out.compiled.graphs == 0  # warmed: the request compiles nothing
    assert "forward" not in runtime.pipe.vae.decoder.__dict__  # eager again outside the call


def test_a_vae_decode_that_fails_to_compile_decodes_eagerly_and_says_so(
    runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.exc import TorchDynamoException

    def failing_compile(*_args: Any, **_kwargs: Any) -> Any:
        def call(*_args: Any, **_kwargs: Any) -> Any:
            raise TorchDynamoException("injected: the decoder does not compile")

        return call

    monkeypatch.setattr("models.presets.apply.compile_forward", failing_compile)
    use_presets(runtime, {"regular": COMPILED_VAE})
    reference = png(generate(runtime, "none"))
    first = generate(runtime, "regular")  # the decode's compile fails inside this request
    assert png(first) == reference
    for _ in range(2):  # from then on every response says so
        out = generate(runtime, "regular")
        assert out.preset_note == (
            "VAE decode compile failed (TorchDynamoException: injected: the decoder does not compile); "
            "decoded eager"
        )
        assert png(out) == reference


def test_static_shapes_compile_again_for_a_new_size(runtime: FluxRuntime) -> None:
    """Dynamic shapes (the default) compile once for every size: tests/models/test_presets.py."""
    use_presets(runtime, {"regular": with_tuning(COMPILED, ["static-shapes"])})
    assert generate(runtime, "regular", (64, 64)).compiled.graphs >= 2  # each block class
    assert generate(runtime, "regular", (64, 96)).compiled.graphs >= 2  # and again
    assert generate(runtime, "regular", (64, 96)).compiled.graphs == 0  # that size is warm now


def test_a_piece_failing_at_warm_up_is_dropped_first_and_the_preset_keeps_the_rest(
    runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    @torch.compiler.disable
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("injected attention failure")

    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName._NATIVE_MATH, broken)
    tuned = Preset("regular", vae_channels_last=True, attention="_native_math")
    manager = use_presets(runtime, {"regular": tuned})
    runtime.warmup([(64, 64)], max_images=1)  # does not raise: the worker reports ready
    why = "RuntimeError: injected attention failure"
    assert manager.runnable["regular"] == (
        Preset("regular", vae_channels_last=True),  # not `none`: only the piece went
        f"tuning (attention backend _native_math) failed ({why}); ran without it",
    )
    out = generate(runtime, "regular")
    assert out.preset == "regular" and out.preset_note == manager.runnable["regular"][1]


def test_cuda_graphs_are_refused_under_a_plan_that_moves_the_weights(runtime: FluxRuntime) -> None:
    torch._dynamo.reset()
    manager = PresetManager(
        runtime.pipe.transformer,
        device="cpu",
        enabled=["regular"],
        data_dir=runtime.presets.compile_cache_dir,
        presets={"regular": with_tuning(COMPILED, ["cuda-graphs"])},
        memory_plan=PLANS["model-offload"],
        compile_backend="eager",
        hardware=HOPPER,
    )
    preset, note = manager.runnable["regular"]
    assert not preset.cuda_graphs and note is not None and "this memory plan moves them" in note
