"""`flux-server generate`: one generation from the command line, to check weights work.

    flux-server generate --model tiny --prompt "a cat" --out cat.png --size 512x512 --seed 1

The output format follows `--out`'s extension (png, jpg/jpeg, webp). With `--num-images N`
(N > 1) the files are `<out>-1.<ext>` .. `<out>-N.<ext>`. With `--image`, the job is
image-to-image and the output size follows the input image (rounded to a multiple of 16).
Exit code 2 for bad arguments and for weights that cannot be loaded.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.jobs import Job

_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class UsageError(ValueError):
    """Bad command-line input: printed on stderr, exit code 2."""


def parse_size(text: str) -> tuple[int, int]:
    """A fal preset name or WxH, rounded and checked with server.jobs.round_size."""
    from server.jobs import IMAGE_SIZE_PRESETS, parse_wxh, round_size

    if text in IMAGE_SIZE_PRESETS:
        return IMAGE_SIZE_PRESETS[text]
    try:
        size = parse_wxh(text)
    except ValueError:
        raise UsageError(
            f"--size {text!r}: expected WxH (e.g. 512x512) or one of {', '.join(IMAGE_SIZE_PRESETS)}"
        ) from None
    try:
        return round_size(*size)
    except ValueError as exc:
        raise UsageError(f"--size {text!r}: {exc}") from exc


def output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, count + 1)]


def _output_format(out: Path) -> str:
    try:
        return _FORMATS[out.suffix.lower()]
    except KeyError:
        raise UsageError(f"--out {out}: the extension must be one of {', '.join(_FORMATS)}") from None


def _build_job(args: argparse.Namespace, output_format: str) -> Job:
    from PIL import Image, UnidentifiedImageError

    from server.jobs import SEED_LIMIT, Job, round_size

    if not 1 <= args.num_images <= 4:
        raise UsageError(f"--num-images must be between 1 and 4, got {args.num_images}")
    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in [0, 2^64), got {args.seed}")
    fields: dict = {
        "prompt": args.prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seed": args.seed,
        "num_images": args.num_images,
        "output_format": output_format,
        "acceleration": args.acceleration,
        "protocol": "cli",
    }
    if args.image is None:
        fields["width"], fields["height"] = parse_size(args.size)
        return Job(task="text-to-image", **fields)
    try:
        with Image.open(args.image) as image:
            image.load()
            size = image.size
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"--image {args.image}: cannot read it as an image ({exc})") from exc
    try:
        fields["width"], fields["height"] = round_size(*size)
    except ValueError as exc:
        raise UsageError(f"--image {args.image}: {exc}") from exc
    return Job(task="image-to-image", image=buffer.getvalue(), strength=args.strength, **fields)


def run_generate(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from server.config import Settings

    out = Path(args.out)
    try:
        job = _build_job(args, _output_format(out))
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # Heavy imports only once the arguments are known to be good.
    from tqdm import tqdm

    from models.loading import load_runtime
    from models.request import InputError, validate
    from models.weights import WeightsError
    from server.worker import generation_request

    request = generation_request(job)  # draws the seed when --seed is not given
    try:
        validate(request)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    data_dir = Path(args.data_dir) if args.data_dir else Settings().data_dir
    started = time.perf_counter()
    try:
        runtime = load_runtime(
            args.model,
            data_dir=data_dir,
            components_dir=Path(args.components_dir) if args.components_dir else None,
            safety_checker=Path(args.safety_checker) if args.safety_checker else None,
            device=args.device,
            presets=tuple(dict.fromkeys(("none", args.acceleration))),
        )
    except WeightsError as exc:
        print(f"error: cannot load --model {args.model}: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad --device, unusable --safety-checker
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"loaded {runtime.model_name} on {runtime.device} in {time.perf_counter() - started:.1f}s")
    print(f"model: {runtime.summary}")

    with tqdm(unit="step", desc="denoising") as bar:

        def on_step(i: int, n: int) -> None:
            bar.total = n
            bar.update(i - bar.n)

        try:
            result = runtime.generate(request, on_step=on_step)
        except InputError as exc:  # e.g. a task the model has no parts for
            print(f"error: {exc}", file=sys.stderr)
            return 2

    paths = output_paths(out, len(result.images))
    for path, image in zip(paths, result.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format=_PIL_FORMATS[job.output_format])
    print(f"seed: {result.seed}")
    if result.preset_note:
        print(f"note: {result.preset_note}")
    for path, flagged in zip(paths, result.has_nsfw_concepts, strict=True):
        print(f"wrote {path} ({job.width}x{job.height}){' [flagged NSFW, blacked out]' if flagged else ''}")
    print(f"inference: {result.timings.get('inference', 0.0):.2f}s")
    return 0
