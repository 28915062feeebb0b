"""FluxRuntime: FLUX.1 [dev] components loaded once, shared by every task.

    runtime = load_runtime("tiny" | "synthetic" | folder | file.safetensors, data_dir=...)
    out: Generation = runtime.generate(request, on_step=lambda i, n: ..., should_cancel=lambda: False)

`request` is a `models.request.GenerationRequest` with a concrete seed; `request.variant` names
the checkpoint it runs on ("dev", the base, or a variant: models/variants/), which the
residency manager (models/residency.py) puts on the device first, when a swap is needed.
`load_runtime` and its options live in models/loading.py. `on_step(i, n)` is called after
every denoising step (i from 1 to n; for image-to-image n is the number of steps left after
`strength`). `should_cancel()` is checked at every step; a cancelled request returns
`cancelled=True` and no images, and the VAE decode never runs (the pipelines always return
latents; this module decodes them).

Errors: `models.request.InputError` when the request cannot run as given (the client's
fault; `VariantUnavailable` for a variant this worker does not serve, `TaskUnavailable` for a
task its variant does not run); anything else raised here is the server's.

Timings (`encode`, `denoise`, `decode`, `safety`, in seconds): on a CUDA device each stage's
clock is read after `torch.cuda.synchronize()`, so a stage is charged the device work it
queued, not only the time it took to queue it (unsynchronised, `denoise` looks short and
`decode` long, since the decode's first copy to the host waits for every queued step).

Safety: with no checker configured, or a request that disables it, `has_nsfw_concepts` is all
False and `nsfw_checked` is False, meaning "not checked", never "checked and clean".

One `generate` runs at a time (a lock): the scheduler is shared and stateful.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.presets.compiling import CompileStats, is_compile_failure
from models.request import (
    BASE_VARIANT,
    MAX_IMAGES,
    GenerationRequest,
    InputError,
    TaskUnavailable,
    VariantUnavailable,
    img2img_steps,
    runs_with_strength,
    validate,
)
from models.variants.pipelines import Variant
from models.variants.sizes import finish_fill, fitted_size, kontext_condition_size, kontext_output_size

if TYPE_CHECKING:
    import torch
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline, FluxPriorReduxPipeline
    from PIL import Image

    from models.lora.manager import LoraManager
    from models.memory import MemoryPlan
    from models.presets.apply import PresetManager
    from models.residency import Residency, Swap
    from models.safety import SafetyChecker

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    images: list[Image.Image]
    seed: int
    has_nsfw_concepts: list[bool]
    nsfw_checked: bool
    timings: dict[str, float] = field(default_factory=dict)
    preset: str = "none"
    preset_note: str | None = None
    cancelled: bool = False
    log: list[str] = field(default_factory=list)  # lines for the job's log (LoRA loads, paths)
    lora_hits: int = 0  # LoRAs already in memory / read from disk for this call
    lora_misses: int = 0
    # What torch.compile compiled during this call: after warm-up, every graph is a recompile.
    compiled: CompileStats = field(default_factory=CompileStats)
    variant: str = BASE_VARIANT
    swap: Swap | None = None  # the variant's move onto the device this call waited for


class FluxRuntime:
    def __init__(
        self,
        *,
        pipe: FluxPipeline,
        img2img: FluxImg2ImgPipeline,
        inpaint: FluxInpaintPipeline,
        redux: FluxPriorReduxPipeline | None,
        safety: SafetyChecker | None,
        presets: PresetManager,
        memory_plan: MemoryPlan,
        device: str,
        model_name: str,
        loras: LoraManager,
        model_kind: str = "diffusers",
        variants: dict[str, Variant] | None = None,
        residency: Residency | None = None,
        unavailable: dict[str, str] | None = None,
    ) -> None:
        """`variants`: the checkpoints besides the base ("dev" is built from `pipe`, `img2img`,
        `inpaint`, `presets` and `loras`); `residency`: which of them are on the device (None:
        all, always); `unavailable`: configured variants this worker does not serve, and why."""
        self.pipe = pipe
        self.img2img = img2img
        self.inpaint = inpaint
        self.redux = redux
        self.safety = safety
        self.memory_plan = memory_plan
        self.device = device
        self.model_name = model_name
        self.model_kind = model_kind  # "tiny", "synthetic", "diffusers" or "single-file"
        self.warmup_compiled = CompileStats()  # what `warmup` compiled
        base = Variant(
            BASE_VARIANT,
            "dev",
            pipe.transformer,
            {"text-to-image": pipe, "image-to-image": img2img, "inpainting": inpaint},
            presets,
            loras,
            source=model_name,
        )
        self.variants: dict[str, Variant] = {BASE_VARIANT: base, **(variants or {})}
        self.residency = residency
        self.unavailable = dict(unavailable or {})
        self._lock = threading.Lock()

    # The base's presets and per-request LoRAs (models/presets, models/lora); each variant has
    # its own (`variants[name].presets`, `.loras`).
    @property
    def presets(self) -> PresetManager:
        return self.variants[BASE_VARIANT].presets

    @presets.setter
    def presets(self, presets: PresetManager) -> None:
        self.variants[BASE_VARIANT].presets = presets

    @property
    def loras(self) -> LoraManager:
        return self.variants[BASE_VARIANT].loras

    @loras.setter
    def loras(self, loras: LoraManager) -> None:
        self.variants[BASE_VARIANT].loras = loras

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks the base runs."""
        base = ("text-to-image", "image-to-image", "inpainting")
        return (*base, "redux") if self.redux is not None else base

    @property
    def safety_checker_configured(self) -> bool:
        return self.safety is not None

    @property
    def summary(self) -> str:
        """One line for logs, the worker's health entry and the CLI: what is loaded."""
        parts = [self.model_name, f"memory plan {self.memory_plan.name}"]
        if self.model_kind == "synthetic":
            parts.append("random weights: outputs are noise, for capacity and load tests only")
        parts.append("safety checker configured" if self.safety is not None else "no safety checker")
        if len(self.variants) > 1:  # server.queue.base.WorkerInfo.held_variants reads this part
            parts.append(f"variants [{self.variant_placement()}]")
        return "; ".join(parts)

    def variant_placement(self) -> str:
        """Where each variant is (device, host, disk), or their names when all stay resident."""
        if self.residency is not None:
            return self.residency.describe()
        return f"device: {', '.join(self.variants)}"

    def variant_for(self, request: GenerationRequest) -> Variant:
        """The variant that runs `request`, or the InputError saying why none does here."""
        variant = self.variants.get(request.variant)
        if variant is None:
            reason = self.unavailable.get(request.variant) or (
                f"variant {request.variant!r} is not configured on this server (configured: "
                f"{', '.join(self.variants)}); add it with --variant {request.variant}=PATH (FLUX_VARIANTS)"
            )
            raise VariantUnavailable(request.variant, reason)
        tasks = self.tasks if variant.name == BASE_VARIANT else variant.tasks
        if request.task == "redux" and self.redux is None:
            raise TaskUnavailable(
                "redux is not available: the loaded model has no redux parts "
                "(image_encoder, feature_extractor, image_embedder)"
            )
        if request.task not in tasks:
            raise TaskUnavailable(
                f"variant {variant.name!r} does not run {request.task!r} (it runs: {', '.join(tasks)})"
            )
        return variant

    # --- generation -----------------------------------------------------------------------
    def generate(
        self,
        request: GenerationRequest,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Generation:
        validate(request)
        variant = self.variant_for(request)
        # The variant stays on the device, and the request's LoRAs on, for this call only
        # (also when it fails).
        with (
            self._lock,
            self._on_device(variant.name) as swap,
            variant.loras.apply(request.loras) as lora_run,
        ):
            before = CompileStats.now()
            generation = self._generate_locked(
                request, variant, on_step, should_cancel, lora_eager=lora_run.eager_reason is not None
            )
            generation.compiled = CompileStats.now() - before
            generation.log = lora_run.log
            if swap is not None:
                generation.log.append(
                    f"Variant {swap.variant} moved onto the device from {swap.source} in {swap.seconds:.2f} s"
                )
            generation.lora_hits, generation.lora_misses = lora_run.hits, lora_run.misses
            generation.variant, generation.swap = variant.name, swap
            return generation

    @contextmanager
    def _on_device(self, name: str) -> Iterator[Swap | None]:
        if self.residency is None:
            yield None
            return
        with self.residency.use(name) as swap:
            yield swap

    def _generate_locked(
        self,
        request: GenerationRequest,
        variant: Variant,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        *,
        lora_eager: bool = False,
    ) -> Generation:
        import torch

        seed = request.seed
        timings: dict[str, float] = {}
        started = time.perf_counter()

        def cancelled(preset: str = "none", note: str | None = None) -> Generation:
            timings["inference"] = time.perf_counter() - started
            return Generation(
                images=[],
                seed=seed,
                has_nsfw_concepts=[],
                nsfw_checked=False,
                timings=timings,
                preset=preset,
                preset_note=note,
                cancelled=True,
            )

        if should_cancel is not None and should_cancel():
            return cancelled()

        input_image = _open_image(request.image) if request.image else None
        with _timed(timings, "encode", self.device), torch.no_grad():
            prompt_embeds, pooled_prompt_embeds = self._encode(request, input_image)

        pipe: Any = variant.pipeline(request.task)
        mask = _open_image(request.mask) if request.mask else None
        width, height, extra = _task_inputs(request, input_image, mask)

        def step_end(pipeline: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(i + 1, pipeline.num_timesteps)
            if should_cancel is not None and should_cancel():
                pipeline._interrupt = True  # the remaining steps are skipped
            return callback_kwargs

        steps = request.steps
        if runs_with_strength(request.task):
            steps = img2img_steps(request.steps, request.strength)
        # A compile failure is the preset's, not the request's: the preset is demoted for good
        # (compiled -> eager -> none, with a note in every response asking for it) and this
        # request runs again in the simpler form. Any other error is raised as it is.
        while True:
            # Noise drawn on the CPU: the same request and seed give the same bytes on this machine.
            generator = torch.Generator("cpu").manual_seed(seed)
            use = variant.presets.use(
                pipe,
                request.acceleration,
                steps=steps,
                # LoRAs live on the loaded weights; the hot-swap slots' slower path runs eager.
                base_weights="LoRAs apply to the weights as loaded" if request.loras else None,
                eager=lora_eager,
            )
            try:
                with use as active, _timed(timings, "denoise", self.device):
                    latents = pipe(
                        prompt_embeds=prompt_embeds,
                        pooled_prompt_embeds=pooled_prompt_embeds,
                        height=height,
                        width=width,
                        num_inference_steps=request.steps,
                        guidance_scale=request.guidance,
                        num_images_per_prompt=1,  # the embeddings already hold one row per image
                        generator=generator,
                        output_type="latent",
                        callback_on_step_end=step_end,
                        **extra,
                    ).images
                break
            except Exception as exc:
                preset = variant.presets.enabled_name(request.acceleration)
                if not is_compile_failure(exc) or not variant.presets.demote(preset, exc):
                    raise
        if pipe.interrupt:
            return cancelled(active.name, active.note)

        # The preset's VAE decode: compiled where it has the `compiled-vae` tuning piece.
        decoding = self.presets.decoding(self.pipe.vae, active.preset)
        with _timed(timings, "decode", self.device), torch.no_grad(), decoding:
            images = self._decode(latents, height, width)
        if request.task == "fill":
            assert input_image is not None and mask is not None
            images = finish_fill(
                images,
                input_image,
                mask,
                paste_back=request.paste_back,
                resize_to_original=request.resize_to_original,
            )

        flags = [False] * len(images)
        checked = request.enable_safety_checker and self.safety is not None
        # The checker's preprocessing (PIL resize and normalisation) is CPU work, but it feeds
        # the checker's own device pass and its verdict decides which images are stored, so it
        # stays here, between the decode and the return; it runs only with a checker configured.
        if checked:
            from models.safety import black_like, threshold_for_tolerance

            with _timed(timings, "safety", self.device):
                flags = self.safety.check(images, threshold=threshold_for_tolerance(request.safety_tolerance))
                images = [
                    black_like(im) if flagged else im for im, flagged in zip(images, flags, strict=True)
                ]

        timings["inference"] = time.perf_counter() - started
        return Generation(
            images=images,
            seed=seed,
            has_nsfw_concepts=flags,
            nsfw_checked=checked,
            timings=timings,
            preset=active.name,
            preset_note=active.note,
        )

    def _encode(
        self, request: GenerationRequest, input_image: Image.Image | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt (or redux image+prompt) embeddings, one row per requested image."""
        if request.task == "redux":
            assert self.redux is not None and input_image is not None
            # prompt=None makes the prior fail; "" is its neutral prompt.
            prior = self.redux(image=input_image, prompt=request.prompt or "")
            n = request.num_images
            return (
                prior.prompt_embeds.repeat_interleave(n, dim=0),
                prior.pooled_prompt_embeds.repeat_interleave(n, dim=0),
            )
        prompt_embeds, pooled_prompt_embeds, _text_ids = self.pipe.encode_prompt(
            prompt=request.prompt,
            prompt_2=None,
            device=self.pipe._execution_device,
            num_images_per_prompt=request.num_images,
            max_sequence_length=512,
        )
        return prompt_embeds, pooled_prompt_embeds

    def _decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        """What FluxPipeline does after its loop when output_type is not "latent"."""
        from diffusers.utils.torch_utils import get_module_execution_device

        from models.memory import enable_vae_tiling_if_large

        pipe = self.pipe
        vae = pipe.vae
        enable_vae_tiling_if_large(vae, width, height, self.memory_plan)
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        latents = latents.to(get_module_execution_device(vae), vae.dtype)
        decoded = vae.decode(latents, return_dict=False)[0]
        return to_pil(decoded)

    def warmup(self, sizes: Sequence[tuple[int, int]], *, max_images: int = MAX_IMAGES) -> float:
        """Compile and warm what requests of these sizes run, for one image and for
        `max_images` (the most a request may ask for), so that no request compiles; seconds.
        `warmup_compiled` then says what was compiled."""
        started = time.perf_counter()
        before = CompileStats.now()
        with self._on_device(BASE_VARIANT):  # the base's weights, wherever residency put them
            self._warm_presets(sizes, max_images)
        self._warm_a_variant(sizes, max_images)
        for width, height in sizes:
            self.generate(
                GenerationRequest(
                    prompt="warmup", width=width, height=height, seed=0, steps=2, enable_safety_checker=False
                )
            )
        compiled = self.warmup_compiled = CompileStats.now() - before
        logger.info("warm-up compiled %d graph(s) in %.1f s", compiled.graphs, compiled.seconds)
        return time.perf_counter() - started

    def _warm_a_variant(self, sizes: Sequence[tuple[int, int]], max_images: int) -> None:
        """One variant's compiled presets: every variant runs its blocks on its weights as
        loaded, a form the base may not have compiled (its `regular` runs on an fp8, fused
        copy under the resident plan). The blocks' compiled code is shared by every variant
        (Fill's blocks are the same), so one text-to-image variant warms them all."""
        candidates = [
            v
            for name, v in self.variants.items()
            if name != BASE_VARIANT and "text-to-image" in v.pipes
            if any(p.compile != "none" for p, _ in v.presets.runnable.values())
        ]
        if not candidates:
            return
        variant = candidates[0]
        with self._on_device(variant.name):
            per_preset = variant.presets.warmup(variant.pipes["text-to-image"], sizes, max_images=max_images)
        logger.info(
            "variant warm-up (%s): %s",
            variant.name,
            ", ".join(f"{n} {s:.1f}s" for n, s in per_preset.items()),
        )

    def _warm_presets(self, sizes: Sequence[tuple[int, int]], max_images: int) -> None:
        """The base's presets (variants of its architecture share its compiled blocks)."""
        # Every enabled preset at every size (dynamic shapes: no later recompiles); a preset
        # that fails here is demoted and warmed in its simpler form (PresetManager.warmup).
        per_preset = self.presets.warmup(self.pipe, sizes, max_images=max_images)
        logger.info("preset warm-up: %s", ", ".join(f"{n} {s:.1f}s" for n, s in per_preset.items()))
        if self.loras.slots_ready:  # the graphs with the LoRA slots on, so no LoRA request compiles
            names = [n for n, (p, _) in self.presets.runnable.items() if p.compile != "none"]
            with self.loras.warm():
                per_preset = self.presets.warmup(
                    self.pipe, sizes, max_images=max_images, names=names, base_weights="LoRA warm-up"
                )
            logger.info("LoRA warm-up: %s", ", ".join(f"{n} {s:.1f}s" for n, s in per_preset.items()))


def _task_inputs(
    request: GenerationRequest, image: Image.Image | None, mask: Image.Image | None
) -> tuple[int, int, dict[str, Any]]:
    """The output size and the pipeline's task arguments. Fill and Kontext make the size their
    input gives (models/variants/sizes.py); inputs are resized here, so that no pipeline
    resizes them on its own (Kontext's `_auto_resize` is always off)."""
    task, width, height = request.task, request.width, request.height
    if task == "text-to-image" or task == "redux":
        return width, height, {}
    assert image is not None
    if task == "image-to-image":
        return width, height, {"image": image, "strength": request.strength}
    if task == "inpainting":
        return width, height, {"image": image, "mask_image": mask, "strength": request.strength}
    if task == "edit":
        width, height = kontext_output_size(request.resolution_mode, *image.size)
        condition = _resized(image, kontext_condition_size(request.resolution_mode, *image.size))
        return width, height, {"image": condition, "max_area": width * height, "_auto_resize": False}
    assert mask is not None
    width, height = fitted_size(*image.size)
    inputs: dict[str, Any] = {
        "image": _resized(image, (width, height)),
        "mask_image": _resized(mask, (width, height)),
    }
    if task == "edit-inpainting":
        assert request.reference_image is not None
        reference = _open_image(request.reference_image)
        inputs |= {
            "image_reference": _resized(reference, fitted_size(*reference.size)),
            "strength": request.strength,
            "max_area": width * height,
            "_auto_resize": False,
        }
    return width, height, inputs


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    from PIL import Image

    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def _open_image(data: bytes) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"the input image cannot be decoded: {exc}") from exc


def to_pil(decoded: torch.Tensor) -> list[Image.Image]:
    """The VAE's output (N, 3, H, W in [-1, 1]) as PIL images, the same bytes as diffusers'
    `image_processor.postprocess(..., output_type="pil")`, with the arithmetic on the tensor's
    device: one uint8 copy to the host (a quarter of the float copy) and no float work on the
    CPU, which would otherwise keep the device idle before the next job."""
    import torch
    from PIL import Image

    # As diffusers: denormalise in the tensor's dtype, then float32 * 255, rounded half to even.
    pixels = (decoded * 0.5 + 0.5).clamp(0, 1).float().mul(255).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # N, H, W, 3 on the host
    return [Image.fromarray(image) for image in array]


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA only; a CPU runs synchronously)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@contextmanager
def _timed(timings: dict[str, float], key: str, device: str) -> Iterator[None]:
    """The stage's seconds, its device work included: the clock is read after synchronising
    at both ends (the work queued before it is not its own). A stage that raises records
    nothing, and no synchronisation runs after a failure (a lost device would raise again,
    hiding the first error)."""
    synchronize(device)
    started = time.perf_counter()
    yield
    synchronize(device)
    timings[key] = time.perf_counter() - started
