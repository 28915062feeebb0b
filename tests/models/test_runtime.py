"""FluxRuntime on the tiny model: the real diffusers pipelines, run on the CPU."""

from __future__ import annotations

import io
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from models.loading import load_runtime
from models.presets.apply import PresetManager
from models.presets.policy import PRESETS, CacheSetting, Preset
from models.request import GenerationRequest, InputError, TaskUnavailable, img2img_steps
from models.runtime import FluxRuntime, Generation, to_pil

# fal's image_size presets: every one must run (the protocol adapters map names onto these).
FAL_SIZES = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}


@pytest.fixture(scope="module")
def data_dir(tiny_model_dir: Path) -> Path:
    # The tiny model lives in <data_dir>/tiny-flux: reuse the folder the shared fixture built.
    return tiny_model_dir.parent


@pytest.fixture(scope="module")
def runtime(data_dir: Path) -> FluxRuntime:
    # Only "none": the compiled presets cost minutes on 2 cores and are tests/models/test_presets.py's.
    return load_runtime("tiny", data_dir=data_dir, device="cpu", presets=("none",))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def input_png(width: int, height: int) -> bytes:
    """A deterministic, non-flat input image."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [((x * 7) % 256, (y * 5) % 256, (x + y) % 256) for y in range(height) for x in range(width)]
    )
    return png_bytes(image)


def job(**fields) -> GenerationRequest:
    defaults = {"width": 64, "height": 64, "prompt": "a red cat", "steps": 2, "seed": 1}
    return GenerationRequest(**{**defaults, **fields})


class DecodeCounter:
    """Counts real VAE decoder forward passes (hook on the decoder module)."""

    def __init__(self, runtime: FluxRuntime) -> None:
        self.calls = 0
        self.vae = runtime.pipe.vae

    def __enter__(self) -> DecodeCounter:
        def count(*_args) -> None:
            self.calls += 1

        self.handle = self.vae.decoder.register_forward_hook(count)
        return self

    def __exit__(self, *_exc) -> None:
        self.handle.remove()


# --- text-to-image ------------------------------------------------------------------------


def test_text_to_image_reports_everything(runtime: FluxRuntime) -> None:
    out = runtime.generate(job(seed=123))
    assert isinstance(out, Generation)
    assert not out.cancelled
    assert [im.size for im in out.images] == [(64, 64)]
    assert out.images[0].mode == "RGB"
    assert out.seed == 123
    assert out.has_nsfw_concepts == [False]
    assert out.nsfw_checked is False  # no checker configured: never "checked"
    assert {"encode", "denoise", "decode", "inference"} <= out.timings.keys()
    assert out.timings["inference"] >= out.timings["denoise"] > 0
    assert out.preset == "none"


class ClockAndSync:
    """Stands in for the CUDA calls on a CPU: records `torch.cuda.synchronize()` calls and the
    runtime's clock reads, in order ("sync", "clock")."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import time

        import torch

        import models.runtime as runtime_module

        self.events: list[str] = []
        real_clock = time.perf_counter

        class Clock:  # what models.runtime reads as `time`
            @staticmethod
            def perf_counter() -> float:
                self.events.append("clock")
                return real_clock()

        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self.events.append("sync"))
        monkeypatch.setattr(runtime_module, "time", Clock)


def test_stage_timings_synchronise_a_cuda_device_before_every_clock_read(
    runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsynchronised, a stage's clock stops when its work is queued, not done: `denoise`
    would look short and `decode` long. Each stage boundary waits for the device first."""
    recorded = ClockAndSync(monkeypatch)
    monkeypatch.setattr(runtime, "device", "cuda")  # the tiny runtime stays on the CPU
    out = runtime.generate(job(seed=5))
    events = recorded.events
    # encode, denoise, decode: synchronised at both ends, each synchronisation right before
    # the clock is read; the total (`inference`) needs none of its own.
    assert events.count("sync") == 6
    assert all(events[i + 1] == "clock" for i, event in enumerate(events) if event == "sync"), events
    assert {"encode", "denoise", "decode", "inference"} <= out.timings.keys()


def test_a_cpu_is_never_synchronised(runtime: FluxRuntime, monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = ClockAndSync(monkeypatch)
    out = runtime.generate(job(seed=5))
    assert "sync" not in recorded.events and "clock" in recorded.events
    assert out.timings["denoise"] > 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_images_leave_the_device_as_uint8_with_the_bytes_diffusers_gives(
    runtime: FluxRuntime, dtype: str
) -> None:
    """`to_pil` does the float work on the device and copies uint8 to the host; the images are
    those of diffusers' own post-processing, byte for byte (clamping and rounding included)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    decoded = (torch.randn(2, 3, 48, 32, generator=generator) * 0.8).to(getattr(torch, dtype))
    ours = to_pil(decoded)
    theirs = runtime.pipe.image_processor.postprocess(decoded, output_type="pil")
    assert [(im.mode, im.size, im.tobytes()) for im in ours] == [
        (im.mode, im.size, im.tobytes()) for im in theirs
    ]


def test_the_runtime_takes_a_concrete_seed_and_draws_none() -> None:
    # The server draws seeds (server.jobs); the runtime's request cannot even be made without one.
    with pytest.raises(TypeError, match="seed"):
        GenerationRequest(prompt="a cat", width=64, height=64)  # type: ignore[call-arg]


def test_seeds_use_the_whole_64_bit_range(runtime: FluxRuntime) -> None:
    # fal's docs show seeds near 1.6e19: replayed, they must work and reproduce.
    top = runtime.generate(job(seed=2**64 - 1))
    assert top.seed == 2**64 - 1
    assert png_bytes(runtime.generate(job(seed=2**64 - 1)).images[0]) == png_bytes(top.images[0])


def test_same_seed_same_bytes_different_seed_differs(runtime: FluxRuntime) -> None:
    a = runtime.generate(job(seed=7))
    b = runtime.generate(job(seed=7))
    c = runtime.generate(job(seed=8))
    assert png_bytes(a.images[0]) == png_bytes(b.images[0])
    assert png_bytes(a.images[0]) != png_bytes(c.images[0])


@pytest.mark.parametrize("count", [1, 4])
def test_num_images_is_one_batch(runtime: FluxRuntime, count: int) -> None:
    steps: list[tuple[int, int]] = []
    out = runtime.generate(job(num_images=count, seed=5), on_step=lambda i, n: steps.append((i, n)))
    assert len(out.images) == count
    assert out.has_nsfw_concepts == [False] * count
    assert len({png_bytes(im) for im in out.images}) == count  # each image has its own noise
    assert steps == [(1, 2), (2, 2)]  # one batch: one pass over the steps, not one per image


def test_num_images_above_four_is_refused(runtime: FluxRuntime) -> None:
    with pytest.raises(InputError, match="num_images must be between 1 and 4"):
        runtime.generate(job(num_images=5))


# --- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(FAL_SIZES))
def test_every_fal_preset_size(runtime: FluxRuntime, preset: str) -> None:
    # A full run: at most ~2 s on 2 cores (1024x1024, mostly the VAE decode).
    width, height = FAL_SIZES[preset]
    out = runtime.generate(job(width=width, height=height, steps=1))
    assert out.images[0].size == (width, height)


def test_custom_size(runtime: FluxRuntime) -> None:
    out = runtime.generate(job(width=112, height=64))
    assert out.images[0].size == (112, 64)


def test_unrounded_size_is_refused_not_silently_rounded(runtime: FluxRuntime) -> None:
    with pytest.raises(InputError, match=r"100x70 is not a multiple of 16.*96x64"):
        runtime.generate(job(width=100, height=70))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 32, "height": 64}, r"width 32 is outside 64\.\.2048"),
        ({"width": 4096, "height": 64}, r"width 4096 is outside 64\.\.2048"),
        ({"width": 2048, "height": 2560}, r"height 2560 is outside"),
        ({"width": 0, "height": 64}, "width 0 is outside"),
        ({"width": 2048, "height": 2048 + 16}, "height 2064 is outside"),
        ({"seed": -1}, r"seed must be in \[0, 2\^64\)"),
        ({"seed": 2**64}, r"seed must be in \[0, 2\^64\)"),
        ({"steps": 0}, "num_inference_steps must be between 1 and 50"),
        ({"steps": 51}, "num_inference_steps must be between 1 and 50"),
        ({"guidance": -1.0}, "guidance_scale must be between 0 and 20"),
        ({"guidance": float("nan")}, "guidance_scale must be between"),
        ({"task": "image-to-image"}, "needs an input image"),
        ({"task": "redux"}, "needs an input image"),
        ({"task": "image-to-image", "image": b"x", "strength": 0.0}, r"strength must be in \(0, 1\]"),
        ({"task": "image-to-image", "image": b"x", "strength": 1.5}, r"strength must be in \(0, 1\]"),
        ({"safety_tolerance": 7}, "safety_tolerance must be between 0 and 6"),
        ({"task": "image-to-image", "image": b"not a png"}, "input image cannot be decoded"),
        ({"task": "redux", "image": b"not a png"}, "input image cannot be decoded"),
    ],
)
def test_out_of_range_values_are_refused(runtime: FluxRuntime, fields: dict, message: str) -> None:
    with DecodeCounter(runtime) as decodes, pytest.raises(InputError, match=message):
        runtime.generate(job(**fields))
    assert decodes.calls == 0


# --- image-to-image and redux ------------------------------------------------------------


def test_image_to_image_follows_job_size_and_strength(runtime: FluxRuntime) -> None:
    steps: list[tuple[int, int]] = []
    image = input_png(100, 70)  # the adapter rounds the input's size into the job
    fields = {"task": "image-to-image", "image": image, "width": 96, "height": 64, "steps": 4}
    out = runtime.generate(job(strength=0.5, **fields), on_step=lambda i, n: steps.append((i, n)))
    assert [im.size for im in out.images] == [(96, 64)]
    assert steps == [(1, 2), (2, 2)]  # 4 steps at strength 0.5: two are run
    again = runtime.generate(job(strength=0.5, **fields))
    assert png_bytes(again.images[0]) == png_bytes(out.images[0])
    stronger = runtime.generate(job(strength=1.0, **fields))
    assert png_bytes(stronger.images[0]) != png_bytes(out.images[0])


def test_img2img_steps_matches_the_pipeline() -> None:
    assert img2img_steps(28, 0.95) == 27
    assert img2img_steps(4, 0.5) == 2
    assert img2img_steps(4, 1.0) == 4
    assert img2img_steps(4, 0.1) == 1


def test_redux_uses_the_input_image(runtime: FluxRuntime) -> None:
    assert "redux" in runtime.tasks
    first = runtime.generate(job(task="redux", image=input_png(64, 64), prompt="", width=80, height=64))
    assert [im.size for im in first.images] == [(80, 64)]
    other = runtime.generate(job(task="redux", image=input_png(64, 48), prompt="", width=80, height=64))
    assert png_bytes(other.images[0]) != png_bytes(first.images[0])
    with_prompt = runtime.generate(
        job(task="redux", image=input_png(64, 64), prompt="a dog", width=80, height=64)
    )
    assert png_bytes(with_prompt.images[0]) != png_bytes(first.images[0])


def test_redux_batch(runtime: FluxRuntime) -> None:
    out = runtime.generate(job(task="redux", image=input_png(64, 64), num_images=2))
    assert len(out.images) == 2


def test_a_value_error_from_inside_diffusers_is_not_the_requests_fault(
    runtime: FluxRuntime, tmp_path: Path
) -> None:
    # A step-cache preset on a transformer that already carries a cache: diffusers itself
    # raises ValueError("... already ..."). That is the server's state, not the client's input.
    from diffusers import FirstBlockCacheConfig

    cached = {"none": PRESETS["none"], "high": Preset("high", cache=CacheSetting("first_block", 0.5))}
    original = runtime.presets
    runtime.presets = PresetManager(
        runtime.pipe.transformer,
        device="cpu",
        enabled=["none", "high"],
        data_dir=tmp_path,
        presets=cached,
        compile_backend="eager",
    )
    runtime.pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        with pytest.raises(ValueError) as raised:
            runtime.generate(job(acceleration="high"))
        assert not isinstance(raised.value, InputError)
        assert "diffusers" in str(raised.traceback[-1].path)
    finally:
        runtime.pipe.transformer.disable_cache()
        runtime.presets = original
    assert len(runtime.generate(job()).images) == 1  # the lock was released, the runtime still works


def test_redux_without_its_parts_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-redux"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("redux"))
    runtime = load_runtime(str(folder), data_dir=tmp_path, device="cpu", presets=("none",))
    assert runtime.tasks == ("text-to-image", "image-to-image", "inpainting")
    assert issubclass(TaskUnavailable, InputError)  # the client asked for what is not loaded
    with pytest.raises(TaskUnavailable, match="redux is not available"):
        runtime.generate(job(task="redux", image=input_png(64, 64)))
    assert runtime.generate(job()).images[0].size == (64, 64)


# --- progress, cancel, presets, concurrency -----------------------------------------------


def test_on_step_is_called_after_every_step(runtime: FluxRuntime) -> None:
    steps: list[tuple[int, int]] = []
    runtime.generate(job(steps=4), on_step=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_cancel_mid_run_skips_remaining_steps_and_the_vae(runtime: FluxRuntime) -> None:
    steps: list[tuple[int, int]] = []
    with DecodeCounter(runtime) as decodes:
        out = runtime.generate(
            job(steps=4),
            on_step=lambda i, n: steps.append((i, n)),
            should_cancel=lambda: len(steps) >= 2,
        )
    assert out.cancelled
    assert out.images == []
    assert out.seed == 1
    assert decodes.calls == 0
    assert steps == [(1, 4), (2, 4)]  # steps 3 and 4 never ran
    # The interrupt does not leak into the next job.
    with DecodeCounter(runtime) as decodes:
        assert len(runtime.generate(job()).images) == 1
    assert decodes.calls == 1


def test_cancel_on_the_last_step_still_skips_the_vae(runtime: FluxRuntime) -> None:
    steps: list[int] = []
    with DecodeCounter(runtime) as decodes:
        out = runtime.generate(
            job(), on_step=lambda i, n: steps.append(i), should_cancel=lambda: len(steps) == 2
        )
    assert out.cancelled and out.images == [] and decodes.calls == 0


def test_cancel_before_start(runtime: FluxRuntime) -> None:
    steps: list[int] = []
    with DecodeCounter(runtime) as decodes:
        out = runtime.generate(job(), on_step=lambda i, n: steps.append(i), should_cancel=lambda: True)
    assert out.cancelled and out.images == [] and steps == [] and decodes.calls == 0


def test_image_to_image_cancel_skips_the_vae_decode(runtime: FluxRuntime) -> None:
    fields = {"task": "image-to-image", "image": input_png(64, 64), "steps": 4, "strength": 1.0}
    with DecodeCounter(runtime) as decodes:
        out = runtime.generate(job(**fields), should_cancel=lambda: True)
    assert out.cancelled and decodes.calls == 0


@pytest.mark.parametrize("requested", ["none", "regular", "high"])
def test_preset_that_ran_is_reported(runtime: FluxRuntime, requested: str) -> None:
    out = runtime.generate(job(acceleration=requested))
    assert out.preset == "none"  # the only preset this runtime enabled
    # A substitution is always explained; the preset asked for and run needs no note.
    if requested == "none":
        assert out.preset_note is None
    else:
        assert out.preset_note is not None and requested in out.preset_note


def test_concurrent_generates_match_sequential_ones(runtime: FluxRuntime) -> None:
    jobs = [job(seed=21, steps=3), job(seed=22, steps=4, width=80)]
    expected = [png_bytes(runtime.generate(j).images[0]) for j in jobs]
    results: dict[int, bytes] = {}

    def run(index: int) -> None:
        results[index] = png_bytes(runtime.generate(jobs[index]).images[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[i] for i in range(len(jobs))] == expected


def test_warmup_runs_each_size(runtime: FluxRuntime) -> None:
    with DecodeCounter(runtime) as decodes:
        seconds = runtime.warmup([(64, 64), (80, 64)])
    assert seconds > 0
    assert decodes.calls == 2


def test_load_logs_that_no_safety_checker_is_configured(data_dir: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="models.runtime"):
        runtime = load_runtime("tiny", data_dir=data_dir, device="cpu")
    assert runtime.safety_checker_configured is False
    assert "no safety checker configured" in caplog.text


# --- no network -----------------------------------------------------------------------------

_network_forbidden = threading.Event()


def _deny_network(event: str, args: tuple) -> None:
    if _network_forbidden.is_set() and event in (
        "socket.connect",
        "socket.getaddrinfo",
        "socket.gethostbyname",
    ):
        raise RuntimeError(f"network access during a forbidden section: {event} {args!r}")


sys.addaudithook(_deny_network)  # audit hooks cannot be removed: the event gates it


@contextmanager
def no_network() -> Iterator[None]:
    _network_forbidden.set()
    try:
        yield
    finally:
        _network_forbidden.clear()


def test_the_network_guard_works() -> None:
    with no_network(), pytest.raises(RuntimeError, match="network access"):
        socket.getaddrinfo("huggingface.co", 443)


def test_loading_and_generating_open_no_connection(data_dir: Path) -> None:
    with no_network():
        runtime = load_runtime("tiny", data_dir=data_dir, device="cpu")
        image = input_png(64, 64)
        runtime.generate(job())
        runtime.generate(job(task="image-to-image", image=image, steps=4))
        out = runtime.generate(job(task="redux", image=image))
    assert len(out.images) == 1
