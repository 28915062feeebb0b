"""FluxRuntime: FLUX.1 [dev] components loaded once, shared by every task.

    runtime = FluxRuntime.load("tiny" | folder | file.safetensors, data_dir=Path(...),
                               components_dir=None, safety_checker=Path | None,
                               device="auto" | "cpu" | "cuda",
                               presets=("none", "regular", "high"), memory_plan="auto")
    out: Generation = runtime.generate(job, on_step=lambda i, n: ..., should_cancel=lambda: False)

`job` is a `server.jobs.Job`. `on_step(i, n)` is called after every denoising step (i from 1
to n; for image-to-image n is the number of steps left after `strength`). `should_cancel()`
is checked at every step; a cancelled job returns `cancelled=True` and no images, and the VAE
decode never runs (the pipelines always return latents; this module decodes them).

Safety: with no checker configured, or a job that disables it, `has_nsfw_concepts` is all
False and `nsfw_checked` is False, meaning "not checked", never "checked and clean".

One `generate` runs at a time (a lock): the scheduler is shared and stateful.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline, FluxPriorReduxPipeline
    from PIL import Image

    from models.lora.manager import LoraManager
    from models.lora.spec import LoraLimits, LoraSpec
    from models.memory import MemoryPlan
    from models.presets import PresetManager
    from models.safety import SafetyChecker
    from server.jobs import Job

logger = logging.getLogger(__name__)

# Sanity limits for values the protocol adapters already check with their own (narrower)
# limits; the runtime refuses anything outside them instead of passing it to diffusers.
MAX_STEPS = 50
MAX_GUIDANCE = 20.0


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


class TaskUnavailable(ValueError):
    """The job asks for a task whose parts are not loaded (redux without the redux folder)."""


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    return device


def validate_job(job: Job) -> None:
    """Refuse values the pipelines would silently change or crash on (ValueError, client's fault)."""
    from server.jobs import round_size

    rounded = round_size(job.width, job.height)  # raises for out-of-bounds sizes
    if rounded != (job.width, job.height):
        raise ValueError(
            f"size {job.width}x{job.height} is not a multiple of 16; "
            f"round it first (nearest valid size: {rounded[0]}x{rounded[1]})"
        )
    if not 1 <= job.num_inference_steps <= MAX_STEPS:
        raise ValueError(
            f"num_inference_steps must be between 1 and {MAX_STEPS}, got {job.num_inference_steps}"
        )
    if not (math.isfinite(job.guidance_scale) and 0 <= job.guidance_scale <= MAX_GUIDANCE):
        raise ValueError(f"guidance_scale must be between 0 and {MAX_GUIDANCE}, got {job.guidance_scale}")
    if job.task in ("image-to-image", "inpainting", "redux") and not job.image:
        raise ValueError(f"task {job.task!r} needs an input image")
    if job.task == "inpainting" and not job.mask:
        raise ValueError("task 'inpainting' needs a mask")
    if job.task in ("image-to-image", "inpainting") and not (
        math.isfinite(job.strength) and 0 < job.strength <= 1
    ):
        raise ValueError(f"strength must be in (0, 1], got {job.strength}")
    if job.safety_tolerance is not None and not 0 <= job.safety_tolerance <= 6:
        raise ValueError(f"safety_tolerance must be between 0 and 6, got {job.safety_tolerance}")


def img2img_steps(steps: int, strength: float) -> int:
    """The steps FluxImg2ImgPipeline actually runs (its get_timesteps arithmetic): the `n` that
    on_step reports; at least 1 for any strength > 0."""
    return steps - int(max(steps - min(steps * strength, steps), 0))


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
    ) -> None:
        self.pipe = pipe
        self.img2img = img2img
        self.inpaint = inpaint
        self.redux = redux
        self.safety = safety
        self.presets = presets
        self.memory_plan = memory_plan
        self.device = device
        self.model_name = model_name
        self.loras = loras
        self._lock = threading.Lock()

    # --- loading ------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str = "tiny",
        *,
        data_dir: Path,
        components_dir: Path | None = None,
        safety_checker: Path | None = None,
        device: str = "auto",
        presets: Sequence[str] | None = None,
        memory_plan: str = "auto",
        lora_limits: LoraLimits | None = None,
    ) -> FluxRuntime:
        """`presets`: the acceleration presets to prepare; None or empty: the device's default
        (models.presets.default_presets). `lora_limits`: per-request LoRA bounds (defaults)."""
        from models.weights import enforce_offline, load_components, resolve_model

        enforce_offline()  # before anything can reach for the hub
        started = time.perf_counter()
        # Resolve first: a broken --model fails before the slow torch/diffusers imports.
        spec = resolve_model(model, data_dir=Path(data_dir), components_dir=components_dir)
        import torch
        from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline, FluxPriorReduxPipeline

        from models.lora.manager import LoraManager
        from models.lora.spec import LoraLimits
        from models.presets import PresetManager, default_presets
        from models.safety import SafetyChecker

        device = resolve_device(device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        parts = load_components(spec, dtype=dtype)

        pipe = FluxPipeline(**parts.pipeline_kwargs())
        pipe.set_progress_bar_config(disable=True)  # progress goes through on_step
        redux = None
        if parts.redux_image_encoder is not None and parts.redux_image_embedder is not None:
            # The prior as published pads with zeros of FLUX's full text width; given the
            # runtime's text encoders it encodes a real (possibly empty) prompt instead.
            redux = FluxPriorReduxPipeline(
                image_encoder=parts.redux_image_encoder,
                feature_extractor=parts.redux_feature_extractor,
                image_embedder=parts.redux_image_embedder,
                text_encoder=pipe.text_encoder,
                tokenizer=pipe.tokenizer,
                text_encoder_2=pipe.text_encoder_2,
                tokenizer_2=pipe.tokenizer_2,
            )
            redux.set_progress_bar_config(disable=True)

        plan = _apply_memory_plan(pipe, redux, memory_plan=memory_plan, device=device)
        # Built after placement so that it shares the very same (already placed) modules.
        img2img = FluxImg2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)
        inpaint = FluxInpaintPipeline(**pipe.components)
        inpaint.set_progress_bar_config(disable=True)

        safety = None
        if safety_checker is not None:
            safety = SafetyChecker(Path(safety_checker), device=device)
        else:
            logger.warning(
                "no safety checker configured (--safety-checker): images are not checked, "
                "has_nsfw_concepts is always false and nsfw_checked false"
            )

        preset_manager = PresetManager(
            pipe.transformer,
            device=device,
            enabled=list(presets) if presets else default_presets(device),
            data_dir=Path(data_dir),
            memory_plan=plan,
        )
        # Compiled presets switch LoRAs by hot-swap; its slots must exist before any compile.
        compiled = any(p.compile != "none" for p, _ in preset_manager.runnable.values())
        loras = LoraManager(pipe, limits=lora_limits or LoraLimits(), hotswap=compiled)
        loras.prepare()
        logger.info(
            "loaded %s on %s (%s, memory plan %s) in %.1fs; redux %s",
            spec.name,
            device,
            str(dtype).removeprefix("torch."),
            plan.name,
            time.perf_counter() - started,
            "available" if redux is not None else "not available",
        )
        return cls(
            pipe=pipe,
            img2img=img2img,
            inpaint=inpaint,
            redux=redux,
            safety=safety,
            presets=preset_manager,
            memory_plan=plan,
            device=device,
            model_name=spec.name,
            loras=loras,
        )

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this runtime can run."""
        base = ("text-to-image", "image-to-image", "inpainting")
        return (*base, "redux") if self.redux is not None else base

    @property
    def safety_checker_configured(self) -> bool:
        return self.safety is not None

    # --- generation -----------------------------------------------------------------------
    def generate(
        self,
        job: Job,
        on_step: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        loras: Sequence[LoraSpec] = (),
    ) -> Generation:
        """`loras`: this request's LoRAs (local files); they apply to this call only."""
        from server.jobs import draw_seed

        validate_job(job)
        if job.task == "redux" and self.redux is None:
            raise TaskUnavailable(
                "redux is not available: the loaded model has no redux parts "
                "(image_encoder, feature_extractor, image_embedder)"
            )
        seed = job.seed if job.seed is not None else draw_seed()
        with self._lock, self.loras.apply(loras) as lora_run:
            generation = self._generate_locked(
                job,
                seed,
                on_step,
                should_cancel,
                lora_eager=lora_run.eager_reason is not None,
                with_loras=bool(loras),
            )
            generation.log = lora_run.log
            return generation

    def _generate_locked(
        self,
        job: Job,
        seed: int,
        on_step: Callable[[int, int], None] | None,
        should_cancel: Callable[[], bool] | None,
        *,
        lora_eager: bool = False,
        with_loras: bool = False,
    ) -> Generation:
        import torch

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

        input_image = _open_image(job.image) if job.image else None
        with _timed(timings, "encode"), torch.no_grad():
            prompt_embeds, pooled_prompt_embeds = self._encode(job, input_image)

        pipe: Any = {"image-to-image": self.img2img, "inpainting": self.inpaint}.get(job.task, self.pipe)
        extra: dict[str, Any] = {}
        if job.task == "image-to-image":
            extra = {"image": input_image, "strength": job.strength}
        elif job.task == "inpainting":
            assert job.mask is not None
            extra = {"image": input_image, "mask_image": _open_image(job.mask), "strength": job.strength}

        def step_end(pipeline: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(i + 1, pipeline.num_timesteps)
            if should_cancel is not None and should_cancel():
                pipeline._interrupt = True  # the remaining steps are skipped
            return callback_kwargs

        # Noise drawn on the CPU: the same job and seed give the same bytes on this machine.
        generator = torch.Generator("cpu").manual_seed(seed)
        use = self.presets.use(
            pipe,
            job.acceleration,
            base_weights="LoRAs apply to the weights as loaded" if with_loras else None,
            eager=lora_eager,
        )
        with use as active, _timed(timings, "denoise"):
            latents = pipe(
                prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                height=job.height,
                width=job.width,
                num_inference_steps=job.num_inference_steps,
                guidance_scale=job.guidance_scale,
                num_images_per_prompt=1,  # the embeddings already hold one row per image
                generator=generator,
                output_type="latent",
                callback_on_step_end=step_end,
                **extra,
            ).images
        if pipe.interrupt:
            return cancelled(active.name, active.note)

        with _timed(timings, "decode"), torch.no_grad():
            images = self._decode(latents, job.height, job.width)

        flags = [False] * len(images)
        checked = job.enable_safety_checker and self.safety is not None
        if checked:
            from models.safety import black_like, threshold_for_tolerance

            with _timed(timings, "safety"):
                flags = self.safety.check(images, threshold=threshold_for_tolerance(job.safety_tolerance))
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

    def _encode(self, job: Job, input_image: Image.Image | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt (or redux image+prompt) embeddings, one row per requested image."""
        if job.task == "redux":
            assert self.redux is not None and input_image is not None
            # prompt=None makes the prior fail; "" is its neutral prompt.
            prior = self.redux(image=input_image, prompt=job.prompt or "")
            n = job.num_images
            return (
                prior.prompt_embeds.repeat_interleave(n, dim=0),
                prior.pooled_prompt_embeds.repeat_interleave(n, dim=0),
            )
        prompt_embeds, pooled_prompt_embeds, _text_ids = self.pipe.encode_prompt(
            prompt=job.prompt,
            prompt_2=None,
            device=self.pipe._execution_device,
            num_images_per_prompt=job.num_images,
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
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    def warmup(self, sizes: Sequence[tuple[int, int]]) -> float:
        """One short text-to-image run per size (compiles/caches what the sizes need); seconds."""
        from server.jobs import Job

        started = time.perf_counter()
        # Compiles every enabled preset for every size (dynamic shapes: no later recompiles).
        per_preset = self.presets.warmup(self.pipe, sizes)
        logger.info("preset warm-up: %s", ", ".join(f"{n} {s:.1f}s" for n, s in per_preset.items()))
        for width, height in sizes:
            job = Job(
                width=width,
                height=height,
                prompt="warmup",
                num_inference_steps=2,
                seed=0,
                enable_safety_checker=False,
                protocol="cli",
            )
            self.generate(job)
        return time.perf_counter() - started


# MEMORY PLAN: the single place where components are placed on the device at load
# (models/memory.py decides; "auto" follows the card's VRAM, resident on a CPU). The only
# other use of the plan is VAE tiling before a large decode (`_decode`).
def _apply_memory_plan(
    pipe: FluxPipeline, redux: FluxPriorReduxPipeline | None, *, memory_plan: str, device: str
) -> MemoryPlan:
    from models.memory import apply_plan, choose_plan, vram_bytes

    plan = choose_plan(vram_bytes(device), forced=memory_plan)  # ValueError for an unknown name
    apply_plan(pipe, plan, device)
    if redux is not None:
        # The prior's own parts (SigLIP, embedder: ~1 GB) stay resident; its text encoders
        # are the pipeline's, already placed by the plan.
        redux.image_encoder.to(device)
        redux.image_embedder.to(device)
    return plan


def _open_image(data: bytes) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"the input image cannot be decoded: {exc}") from exc


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = time.perf_counter() - started
