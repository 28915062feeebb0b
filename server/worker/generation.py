"""One job on the runtime, with the out-of-memory fallback.

An out-of-memory frees what the failed attempt held (Python's references, then the CUDA
cache) and, for several images, generates them one at a time. Seeds: the noise of a batch is
drawn from one generator seeded with the job's seed, so image 1 of the retry (seed `s`) is
image 1 of the batch; images 2..N of the retry use seeds `s+1`, `s+2`..., which differ from the
batch's images 2..N (those continue the first generator's stream). The job's log says so.
A single image that does not fit fails with `GpuOutOfMemory` (the size, and what to try).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from models.request import SEED_LIMIT, GenerationRequest
from server.worker.faults import GpuFault, GpuOutOfMemory, gpu_fault

if TYPE_CHECKING:
    from models.runtime import FluxRuntime, Generation

logger = logging.getLogger(__name__)

OnStep = Callable[[int, int], None]


def free_device_memory(device: str) -> None:
    """Drop unreachable tensors and return the CUDA allocator's cached blocks."""
    gc.collect()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def generate(
    runtime: FluxRuntime,
    request: GenerationRequest,
    *,
    on_step: OnStep,
    should_cancel: Callable[[], bool],
    device: str,
) -> Generation:
    try:
        return runtime.generate(request, on_step=on_step, should_cancel=should_cancel)
    except Exception as exc:
        if gpu_fault(exc) is not GpuFault.OUT_OF_MEMORY:
            raise
        logger.warning(
            "out of memory: %d image(s) of %dx%d", request.num_images, request.width, request.height
        )
    # Outside the except block: the traceback (and the tensors its frames hold) is gone.
    free_device_memory(device)
    if request.num_images == 1:
        raise GpuOutOfMemory(request.width, request.height, 1)
    return _one_at_a_time(runtime, request, on_step=on_step, should_cancel=should_cancel, device=device)


def _one_at_a_time(
    runtime: FluxRuntime,
    request: GenerationRequest,
    *,
    on_step: OnStep,
    should_cancel: Callable[[], bool],
    device: str,
) -> Generation:
    count = request.num_images
    parts: list[Generation] = []
    for index in range(count):

        def step(i: int, total: int, done: int = index) -> None:  # progress over the whole job
            on_step(done * total + i, count * total)

        single = dataclasses.replace(request, num_images=1, seed=(request.seed + index) % SEED_LIMIT)
        try:
            part = runtime.generate(single, on_step=step, should_cancel=should_cancel)
        except Exception as exc:
            if gpu_fault(exc) is not GpuFault.OUT_OF_MEMORY:
                raise
            failed = True
        else:
            failed = False
        if failed:
            free_device_memory(device)
            raise GpuOutOfMemory(request.width, request.height, count)
        if part.cancelled:
            return part
        parts.append(part)
    first = parts[0]
    seeds = ", ".join(str(p.seed) for p in parts)
    note = (
        f"Out of GPU memory for {count} images of {request.width}x{request.height} at once; "
        f"generated one at a time with seeds {seeds}"
    )
    timings: dict[str, float] = {}
    for part in parts:
        for key, seconds in part.timings.items():
            timings[key] = timings.get(key, 0.0) + seconds
    return dataclasses.replace(
        first,
        images=[image for p in parts for image in p.images],
        seed=request.seed,
        has_nsfw_concepts=[flag for p in parts for flag in p.has_nsfw_concepts],
        nsfw_checked=all(p.nsfw_checked for p in parts),
        timings=timings,
        log=[*first.log, note],
        lora_hits=sum(p.lora_hits for p in parts),
        lora_misses=sum(p.lora_misses for p in parts),
    )
