"""Resolving a request's LoRA `path` to a local safetensors file, with no internet.

In this order:
1. a URL of this server's own files (`{base}/files/<name>`, e.g. a fal upload, or its bucket
   URL with object storage): the stored file, read from the disk or copied once from the
   bucket into the download cache, no HTTP round trip through this server;
2. a Hugging Face file URL (`https://huggingface.co/<owner>/<name>/resolve/<rev>/<file>`): the
   local Hugging Face cache, offline;
3. any other http(s) URL (a server on the studio's network): downloaded once into the cache;
4. a name or relative path inside `--lora-dir` (`style`, `style.safetensors`, `team/x`):
   that file; a path that leads outside the folder is refused;
5. a Hugging Face repo id, `owner/name` or `owner/name/file.safetensors`: the local Hugging
   Face cache only (never a network call).

Every failure is a LoraError naming the path as the client wrote it, except an outage of
this server's store (StorageUnavailable), which is not the request's fault.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from models.lora.errors import LoraError
from models.lora.spec import LoraSpec
from server.storage import Storage, StorageUnavailable
from server.worker.lora.cache import DownloadCache

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:/(?P<file>[\w./-]+\.safetensors))?$")
_HF_HOSTS = {"huggingface.co", "hf.co", "www.huggingface.co"}
# A repo's one LoRA file when it has several safetensors files (diffusers' default name).
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class ResolvedLora:
    path: str  # as the client wrote it
    file: Path
    source: str  # "upload" | "download" | "lora-dir" | "hf-cache"


class LoraResolver:
    def __init__(
        self,
        *,
        cache: DownloadCache,
        storage: Storage,
        lora_dir: Path | None = None,
        hf_cache_dir: Path | None = None,
    ) -> None:
        self.cache = cache
        self.storage = storage
        self.lora_dir = Path(lora_dir).resolve() if lora_dir is not None else None
        self.hf_cache_dir = hf_cache_dir  # None: huggingface_hub's own (HF_HUB_CACHE, HF_HOME)

    def resolve(self, path: str, *, own_base_urls: Iterable[str] = (), download: bool = True) -> ResolvedLora:
        """`download=False`: a URL not in the cache yet is a LoraError instead of a download."""
        text = path.strip()
        if not text:
            raise LoraError(path, "is empty")
        scheme = text.split(":", 1)[0].lower() if ":" in text else ""
        if scheme in ("http", "https"):
            return self._from_url(path, text, list(own_base_urls), download)
        if scheme and len(scheme) > 1:
            raise LoraError(path, f"{scheme}: URLs are not supported (http(s) URL, LoRA name or repo id)")
        local = self._from_lora_dir(path, text)
        if local is not None:
            return local
        match = _REPO_ID.match(text)
        if match is not None:
            return ResolvedLora(path, self._from_hf_cache(path, match["repo"], match["file"]), "hf-cache")
        where = f"in the LoRA folder {self.lora_dir}" if self.lora_dir else "(no --lora-dir is configured)"
        raise LoraError(path, f"not found {where}, and it is not a Hugging Face repo id")

    # --- URLs -------------------------------------------------------------------------------
    def _from_url(self, path: str, url: str, own_base_urls: list[str], download: bool) -> ResolvedLora:
        try:
            stored = self.storage.local_copy(url, own_base_urls, self.cache.folder, fetch=download)
        except FileNotFoundError:
            raise LoraError(path, "this server has no such file (expired or never uploaded)") from None
        except StorageUnavailable:
            raise  # the store is down for now: not the request's fault (the worker retries)
        except OSError as exc:
            raise LoraError(path, f"this server's file could not be read: {exc.strerror or exc}") from exc
        if stored is not None:
            if stored.parent == self.cache.folder:  # copied from a bucket: bounded like downloads
                self.cache.evict(keep=frozenset({stored}))
            return ResolvedLora(path, stored, "upload")
        parts = urlsplit(url)
        if (parts.hostname or "").lower() in _HF_HOSTS:
            pieces = [unquote(p) for p in parts.path.strip("/").split("/")]
            if len(pieces) >= 5 and pieces[2] in ("resolve", "blob"):
                repo, revision, file = "/".join(pieces[:2]), pieces[3], "/".join(pieces[4:])
                return ResolvedLora(
                    path, self._from_hf_cache(path, repo, file, revision=revision), "hf-cache"
                )
            raise LoraError(path, "is a Hugging Face page, not a file URL (.../resolve/<revision>/<file>)")
        if not download and not self.cache.path_for(url).is_file():
            raise LoraError(path, "not downloaded yet")
        return ResolvedLora(path, self.cache.get(url), "download")

    # --- the LoRA folder --------------------------------------------------------------------
    def _from_lora_dir(self, path: str, text: str) -> ResolvedLora | None:
        if Path(text).is_absolute() or text.startswith("~"):
            raise LoraError(path, "absolute paths are not accepted; name a file inside the LoRA folder")
        if self.lora_dir is None:
            return None
        for candidate_name in (text, f"{text}.safetensors"):
            candidate = (self.lora_dir / candidate_name).resolve()
            if not candidate.is_relative_to(self.lora_dir):
                raise LoraError(path, "leads outside the LoRA folder")
            if candidate.is_file():
                return ResolvedLora(path, candidate, "lora-dir")
        return None

    # --- the Hugging Face cache -------------------------------------------------------------
    def _from_hf_cache(self, path: str, repo: str, file: str | None, revision: str | None = None) -> Path:
        from huggingface_hub import try_to_load_from_cache

        if file is not None:
            found = try_to_load_from_cache(repo, file, cache_dir=self.hf_cache_dir, revision=revision)
            if isinstance(found, str):
                return Path(found)
            raise LoraError(
                path, f"{file} of {repo} is not in the local Hugging Face cache (this server is offline)"
            )
        files = self._cached_safetensors(repo)
        if not files:
            raise LoraError(path, f"{repo} is not in the local Hugging Face cache (this server is offline)")
        if len(files) == 1:
            return next(iter(files.values()))
        if DIFFUSERS_WEIGHT_NAME in files:
            return files[DIFFUSERS_WEIGHT_NAME]
        names = ", ".join(sorted(files))
        raise LoraError(path, f"{repo} holds several safetensors files ({names}); name one: {repo}/<file>")

    def _cached_safetensors(self, repo: str) -> dict[str, Path]:
        """The safetensors files of the cached revision `main` points at (or the newest)."""
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            info = scan_cache_dir(self.hf_cache_dir)
        except CacheNotFound:
            return {}
        for cached in info.repos:
            if cached.repo_id != repo or cached.repo_type != "model":
                continue
            revisions = sorted(cached.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
            if not revisions:
                return {}
            snapshot = revisions[-1].snapshot_path
            return {
                str(f.file_path.relative_to(snapshot)): f.file_path
                for f in revisions[-1].files
                if f.file_name.endswith(".safetensors")
            }
        return {}


def resolve_all(
    resolver: LoraResolver,
    loras: Iterable[tuple[str, float]],
    *,
    own_base_urls: Iterable[str],
    max_total_bytes: int,
) -> list[LoraSpec]:
    """A request's (path, scale) pairs -> LoraSpecs for the runtime; the total size bounded."""
    bases = list(own_base_urls)
    specs: list[LoraSpec] = []
    total = 0
    for path, scale in loras:
        resolved = resolver.resolve(path, own_base_urls=bases)
        try:
            total += resolved.file.stat().st_size
        except OSError as exc:
            raise LoraError(path, f"the file cannot be read ({exc.strerror or exc})") from exc
        specs.append(LoraSpec(path, resolved.file, scale))
    if total > max_total_bytes:
        names = ", ".join(s.name for s in specs)
        raise LoraError(
            names,
            f"together {total / 1024**2:.1f} MB, above this server's limit of "
            f"{max_total_bytes / 1024**2:.1f} MB per request",
        )
    return specs
