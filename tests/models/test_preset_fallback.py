"""A preset never kills a worker: a preset whose quantization, compile or warm-up fails runs
in a simpler form (compiled -> eager -> `none`), every response that asked for it says why,
and the log has the error. Failures are injected into the real tiny runtime."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from models.loading import load_runtime
from models.presets.apply import PresetManager
from models.presets.policy import PRESETS, CacheSetting, Hardware, Preset
from models.request import GenerationRequest
from models.runtime import FluxRuntime, Generation

CPU = Hardware("cpu", None, torchao=True, compiler=True)
COMPILED = Preset("regular", compile="regional")
INT8 = Preset("regular", precision="int8")


@pytest.fixture(scope="module")
def runtime(tiny_model_dir: Path) -> FluxRuntime:
    return load_runtime("tiny", data_dir=tiny_model_dir.parent, device="cpu", presets=("none",))


@pytest.fixture(scope="module")
def reference(runtime: FluxRuntime) -> bytes:
    """What `none` (the loaded weights, eager) makes of the test request."""
    return png(generate(runtime, "none"))


def use_presets(runtime: FluxRuntime, presets: dict[str, Preset], backend: Any) -> PresetManager:
    """The runtime's presets replaced by `presets`, compiled through `backend`."""
    torch._dynamo.reset()
    runtime.presets = PresetManager(
        runtime.pipe.transformer,
        device="cpu",
        enabled=list(presets),
        data_dir=runtime.presets.compile_cache_dir,  # any folder: it holds the compile cache
        presets=presets,
        compile_backend=backend,
        hardware=CPU,
    )
    return runtime.presets


def failing_backend(_graph: Any, _example_inputs: Any) -> Any:
    raise RuntimeError("injected: no C compiler here")


def generate(runtime: FluxRuntime, acceleration: str) -> Generation:
    request = GenerationRequest(
        prompt="a red cat", width=64, height=64, steps=2, seed=7, acceleration=acceleration
    )
    return runtime.generate(request)


def png(out: Generation) -> bytes:
    buffer = io.BytesIO()
    out.images[0].save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_failing_quantization_runs_the_loaded_weights_and_says_so(
    runtime: FluxRuntime, reference: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_quantize(*_args: Any) -> None:
        raise RuntimeError("injected quantization failure")

    monkeypatch.setattr("models.presets.apply.quantize", broken_quantize)
    with caplog.at_level(logging.WARNING, logger="models.presets.apply"):
        use_presets(runtime, {"none": PRESETS["none"], "regular": INT8}, "eager")
    assert "injected quantization failure" in caplog.text
    for _ in range(2):  # every response that asks for it
        out = generate(runtime, "regular")
        assert out.preset == "regular"
        assert out.preset_note == (
            "int8 quantization failed (RuntimeError: injected quantization failure); ran the loaded precision"
        )
        assert png(out) == reference  # the loaded weights, eagerly


def test_a_compile_failing_at_warm_up_runs_eager_and_says_so(
    runtime: FluxRuntime, reference: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    manager = use_presets(runtime, {"none": PRESETS["none"], "regular": COMPILED}, failing_backend)
    with caplog.at_level(logging.WARNING, logger="models.presets.apply"):
        runtime.warmup([(64, 64)], max_images=2)  # does not raise: the worker would report ready
    assert manager.runnable["regular"][0] == Preset("regular")  # eager now
    assert "preset regular: regional compile failed (BackendCompilerFailed" in caplog.text
    assert "injected: no C compiler here" in caplog.text  # the log has the cause
    for _ in range(2):
        out = generate(runtime, "regular")
        assert out.preset == "regular"
        assert out.preset_note is not None
        assert out.preset_note.startswith("regional compile failed (BackendCompilerFailed: ")
        assert out.preset_note.endswith("; ran eager")
        assert png(out) == reference
    assert generate(runtime, "none").preset_note is None  # other presets are untouched


def test_a_compile_failing_inside_a_request_runs_that_request_eagerly(
    runtime: FluxRuntime, reference: bytes
) -> None:
    manager = use_presets(runtime, {"none": PRESETS["none"], "regular": COMPILED}, failing_backend)
    first = generate(runtime, "regular")  # no warm-up: the compile fails inside this request
    assert first.preset == "regular" and "regional compile failed" in (first.preset_note or "")
    assert png(first) == reference
    assert manager.runnable["regular"][0].compile == "none"
    second = generate(runtime, "regular")
    assert second.preset_note == first.preset_note and second.compiled.graphs == 0


def test_a_preset_failing_eagerly_too_runs_none_and_says_why(
    runtime: FluxRuntime, reference: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.presets import apply

    high = Preset("high", compile="regional", cache=CacheSetting("first_block", 0.5))
    manager = use_presets(runtime, {"none": PRESETS["none"], "high": high}, failing_backend)
    working = apply.cache_config

    def cache_failing_when_eager(setting: CacheSetting, steps: int) -> Any:
        if manager.runnable["high"][0].compile == "none":  # the eager form fails too
            raise RuntimeError("injected cache failure")
        return working(setting, steps)

    monkeypatch.setattr(apply, "cache_config", cache_failing_when_eager)
    runtime.warmup([(64, 64)], max_images=1)
    assert manager.runnable["high"][0] == Preset("none")
    out = generate(runtime, "high")
    assert out.preset == "none"
    note = out.preset_note or ""
    assert note.startswith("regional compile failed (BackendCompilerFailed")
    assert note.endswith(
        "; ran eager; preset 'high' failed (RuntimeError: injected cache failure); ran 'none'"
    )
    assert png(out) == reference


def test_a_preset_failing_otherwise_runs_none_at_once(
    runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a compile failure (here the step cache): eager would fail the same way."""

    def broken_cache(*_args: Any) -> None:
        raise RuntimeError("injected cache failure")

    monkeypatch.setattr("models.presets.apply.cache_config", broken_cache)
    high = Preset("high", compile="regional", cache=CacheSetting("first_block", 0.5))
    manager = use_presets(runtime, {"none": PRESETS["none"], "high": high}, failing_backend)
    manager.warmup(runtime.pipe, [(64, 64)], steps=1)
    assert manager.runnable["high"] == (
        Preset("none"),
        "preset 'high' failed (RuntimeError: injected cache failure); ran 'none'",
    )


def test_nothing_is_simpler_than_the_plain_weights(runtime: FluxRuntime) -> None:
    """A failure of `none` itself is the model's: it is raised, never hidden."""
    manager = use_presets(runtime, {"none": PRESETS["none"]}, "eager")
    assert not manager.demote("none", RuntimeError("the model itself failed"))
    assert manager.runnable["none"] == (PRESETS["none"], None)
