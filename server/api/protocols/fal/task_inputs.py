"""The input images a task takes and the output size they lead to, for fal's endpoints.

Each task reads the fields its wire models have (`image_url`, `mask_url`,
`reference_image_url`, `image_size`, `resolution_mode`) and loads every image through
server/api/inputs.py (header check, decode, shrink to what the model uses), so a bad image is
a 422 at submit. How each image is stored, and what the worker does with it:

- image-to-image, inpainting: `image` (and `mask`) at the output size, which is the input's,
  rounded to 16 (an input outside the bounds is a 422, as before).
- redux: `image` at SigLIP's 384 px; the size from `image_size`.
- fill: `image` at its own size (scaled into the bounds when larger) and `mask` at that size; the
  output size is `image_size`, else the input's rounded to 16. The worker generates at
  width x height, pastes the input back (`paste_back`) and, with `resize_to_original`, resizes
  the output to the size of `image`.
- edit (Kontext): the output size from `resolution_mode` (server/api/output_sizes.py); `image`
  at that size for `match_input`, else at most the ~1 MP Kontext resizes it to.
- edit-inpainting (Kontext inpaint): `image` and `mask` at the output size (the input's,
  rounded to 16, scaled into the bounds); `reference_image` at most ~1 MP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi.exceptions import RequestValidationError

from server.api.inputs import (
    REDUX_FIT,
    FitRule,
    InputImage,
    InputImageError,
    LocalFile,
    load_image,
    mask_fit,
    target_fit,
)
from server.api.output_sizes import (
    conditioning_fit,
    follow_input,
    follow_input_fit,
    kontext_image_fit,
    kontext_size,
    within_bounds_fit,
)
from server.api.protocols.fal.models import resolve_image_size, validation_error
from server.config import Settings
from server.fetch import FetchPolicy
from server.jobs import Task, round_size
from server.storage import Storage


@dataclass(frozen=True)
class TaskInputs:
    width: int
    height: int
    image: bytes | None = None
    mask: bytes | None = None
    reference_image: bytes | None = None


# (url, field name for a 422's loc, how to shrink it) -> the image
Loader = Callable[[str, str, FitRule], Awaitable[InputImage]]


async def task_inputs(
    task: Task, data: Any, *, settings: Settings, storage: Storage | None, base_url: str
) -> TaskInputs:
    """The output size and input images of a validated request for `task`."""
    load = partial(load_input, settings=settings, storage=storage, base_url=base_url)
    try:
        return await TASKS[task](data, load)
    except InputImageError as exc:  # an output size the input image's size cannot make
        raise RequestValidationError(
            [validation_error(["body", "image_url"], exc.message, exc.error_type)]
        ) from None


async def _text_to_image(data: Any, load: Loader) -> TaskInputs:
    return TaskInputs(*resolve_image_size(data.image_size))


async def _redux(data: Any, load: Loader) -> TaskInputs:
    image = await load(data.image_url, "image_url", REDUX_FIT)
    return TaskInputs(*resolve_image_size(data.image_size), image=image.png)


async def _image_to_image(data: Any, load: Loader) -> TaskInputs:
    # The output has the input's size (rounded to 16 px): known from the image's header.
    image = await load(data.image_url, "image_url", lambda w, h: target_fit(*output_size(w, h)))
    width, height = output_size(image.source_width, image.source_height)
    mask = None
    if task_has_mask(data):
        mask = (await load(data.mask_url, "mask_url", mask_fit(width, height))).png
    return TaskInputs(width, height, image=image.png, mask=mask)


async def _fill(data: Any, load: Loader) -> TaskInputs:
    image = await load(data.image_url, "image_url", within_bounds_fit)
    mask = await load(data.mask_url, "mask_url", mask_fit(image.width, image.height))
    if data.image_size is not None:
        width, height = resolve_image_size(data.image_size)
    else:
        width, height = follow_input(image.source_width, image.source_height)
    return TaskInputs(width, height, image=image.png, mask=mask.png)


async def _edit(data: Any, load: Loader) -> TaskInputs:
    image = await load(data.image_url, "image_url", kontext_image_fit(data.resolution_mode))
    width, height = kontext_size(data.resolution_mode, image.source_width, image.source_height)
    return TaskInputs(width, height, image=image.png)


async def _edit_inpainting(data: Any, load: Loader) -> TaskInputs:
    image = await load(data.image_url, "image_url", follow_input_fit)
    width, height = follow_input(image.source_width, image.source_height)
    mask = await load(data.mask_url, "mask_url", mask_fit(width, height))
    reference = await load(data.reference_image_url, "reference_image_url", conditioning_fit)
    return TaskInputs(width, height, image=image.png, mask=mask.png, reference_image=reference.png)


TASKS: dict[Task, Callable[[Any, Loader], Awaitable[TaskInputs]]] = {
    "text-to-image": _text_to_image,
    "redux": _redux,
    "image-to-image": _image_to_image,
    "inpainting": _image_to_image,
    "fill": _fill,
    "edit": _edit,
    "edit-inpainting": _edit_inpainting,
}


def task_has_mask(data: Any) -> bool:
    return isinstance(getattr(data, "mask_url", None), str)


def output_size(input_width: int, input_height: int) -> tuple[int, int]:
    """Image-to-image and inpainting: the output size for an input of this size (the input's,
    rounded to 16 px). Raises InputImageError for one outside the output bounds."""
    try:
        return round_size(input_width, input_height)
    except ValueError as exc:
        kind = "image_too_small" if min(input_width, input_height) < 64 else "image_too_large"
        raise InputImageError(kind, f"Input image: {exc}") from None


async def load_input(
    url: str, field: str, fit: FitRule, *, settings: Settings, storage: Storage | None, base_url: str
) -> InputImage:
    """An input image (`image_url`, `mask_url`, ...) shrunk by `fit`, or a 422 located at `field`."""
    try:
        return await load_image(
            url,
            max_bytes=settings.max_input_image_bytes,
            timeout=settings.input_fetch_timeout,
            policy=FetchPolicy.from_settings(settings),
            fit=fit,
            threads=settings.input_decode_threads,
            # An upload to this server is read from its store, not fetched over HTTP.
            local_file=own_file_reader(storage, (base_url, settings.public_url)),
        )
    except InputImageError as exc:
        raise RequestValidationError(
            [validation_error(["body", field], exc.message, exc.error_type)]
        ) from None


def own_file_reader(storage: Storage | None, base_urls: tuple[str | None, ...]) -> LocalFile | None:
    """Reads an input URL of this server's own files from the store (None: not one of ours)."""
    if storage is None:
        return None
    return lambda url, max_bytes: storage.read_own(url, base_urls, max_bytes)
