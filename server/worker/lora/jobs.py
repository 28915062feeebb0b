"""The worker's side of a job's LoRAs: resolve them, report their errors, prefer jobs whose
LoRAs this worker already holds.

    loras = JobLoras(settings, storage)
    specs = loras.specs(job)                     # LoraError for a bad or unreachable LoRA
    specs = loras.specs_retrying(job, stopping, note)  # ... waiting out an outage of the store
    loras.error(job, exc)                        # -> JobError, fal's 422 shape, naming the LoRA
    queue.claim(worker_id, timeout, prefer=loras.preference(runtime.loras.loaded))
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from models.lora.errors import LoraError
from models.lora.spec import LoraLimits, LoraSpec
from server import metrics
from server.config import Settings
from server.fetch import FetchPolicy
from server.jobs import Job, JobError
from server.queue.base import ClaimPreference
from server.storage import Storage, StorageUnavailable
from server.worker.lora.cache import DownloadCache
from server.worker.lora.sources import LoraResolver, resolve_all
from server.worker.retry import Backoff

logger = logging.getLogger(__name__)

# fal's error shape for a LoRA the request named: its `type`.
LORA_ERROR_TYPE = "lora_load_error"


class JobLoras:
    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.cache = DownloadCache(
            settings.lora_cache_path,
            max_total_bytes=settings.lora_cache_bytes,
            max_file_bytes=settings.lora_max_bytes,
            timeout=settings.lora_download_timeout,
            policy=FetchPolicy.from_settings(settings),
        )
        self.resolver = LoraResolver(cache=self.cache, storage=storage, lora_dir=settings.lora_dir)

    def limits(self) -> LoraLimits:
        s = self.settings
        return LoraLimits(
            max_rank=s.lora_max_rank,
            max_file_bytes=s.lora_max_bytes,
            max_loaded=s.lora_max_loaded,
            max_per_request=s.lora_max_per_request,
            hotswap=s.lora_hotswap,
            hotswap_rank=s.lora_hotswap_rank,
        )

    def own_base_urls(self, job: Job) -> list[str]:
        return [url for url in (job.base_url, self.settings.public_url) if url]

    def specs(self, job: Job) -> list[LoraSpec]:
        if len(job.loras) > self.settings.lora_max_per_request:
            raise LoraError(
                ", ".join(lora.path for lora in job.loras),
                f"at most {self.settings.lora_max_per_request} LoRAs per request on this server",
            )
        hits, misses = self.cache.stats.hits, self.cache.stats.misses
        try:
            return resolve_all(
                self.resolver,
                [(lora.path, lora.scale) for lora in job.loras],
                own_base_urls=self.own_base_urls(job),
                max_total_bytes=self.settings.lora_max_total_bytes,
            )
        finally:
            metrics.lora_downloads_total.labels("hit").inc(self.cache.stats.hits - hits)
            metrics.lora_downloads_total.labels("miss").inc(self.cache.stats.misses - misses)

    def specs_retrying(
        self, job: Job, stopping: threading.Event, note: Callable[[str], None]
    ) -> list[LoraSpec] | None:
        """`specs`, tried again with backoff while this server's store is unavailable (a
        bucket outage: the LoRA is one of its uploads), for up to `--storage-retry-seconds`,
        the same patience as for storing outputs; then StorageUnavailable is raised. `note`
        tells the request's log. None: the worker is stopping (the job goes back)."""
        give_up_at = time.monotonic() + self.settings.storage_retry_seconds
        backoff = Backoff()
        while True:
            try:
                return self.specs(job)
            except StorageUnavailable as exc:
                left = give_up_at - time.monotonic()
                if left <= 0:
                    raise
                logger.warning("reading a LoRA from the store failed: %s; retrying for %.0f s", exc, left)
                note(f"Reading a LoRA from the store failed ({exc.strerror}); retrying for {left:.0f} s")
                if stopping.wait(min(backoff.next_delay(), left)):
                    return None

    def error(self, job: Job, exc: LoraError) -> JobError:
        """fal's validation shape, located at the LoRA's `path` when it is one of the job's."""
        paths = [lora.path for lora in job.loras]
        loc: list[str | int] = ["body", "loras"]
        if exc.lora in paths:
            loc += [paths.index(exc.lora), "path"]
        detail = {"loc": loc, "msg": str(exc), "type": LORA_ERROR_TYPE, "input": exc.lora}
        return JobError(
            message=str(exc), error_type=LORA_ERROR_TYPE, status_code=422, body={"detail": [detail]}
        )

    def preference(self, loaded: Callable[[], list[str]]) -> ClaimPreference | None:
        """Prefer queued jobs whose every LoRA is already in this worker's memory."""
        held = set(loaded())
        if not held:
            return None

        def wants(job: Job) -> bool:
            if not job.loras:
                return False
            files = [self.peek(lora.path, job) for lora in job.loras]
            return all(f is not None and str(f) in held for f in files)

        return ClaimPreference(wants=wants)

    def peek(self, path: str, job: Job) -> Path | None:
        """The local file `path` resolves to if that needs no download, else None (cheap: it
        runs inside the queue's claim)."""
        text = path.strip()
        if text.lower().startswith(("http://", "https://")):
            cached = self.cache.path_for(text)
            if cached.is_file():
                return cached.resolve()
        try:
            resolved = self.resolver.resolve(path, own_base_urls=self.own_base_urls(job), download=False)
        except LoraError:
            return None
        return resolved.file.resolve()
