"""Downloaded LoRAs on disk, one file per URL, bounded in bytes (least recently used goes first).

Several workers may share the folder: a download goes to a private partial file and is
renamed into place, so a reader sees a whole file or none. Recency is each file's access time,
set explicitly on every use (independent of the mount's atime options); the modification
time stays that of the download, which is what the runtime's in-memory caches key on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from models.lora.errors import LoraError
from server.fetch import FetchPolicy, FetchRefused, HostRules, get_following_redirects, pinned_client

_CHUNK = 1024 * 1024


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evicted: int = 0


class DownloadCache:
    def __init__(
        self,
        folder: Path,
        *,
        max_total_bytes: int,
        max_file_bytes: int,
        timeout: float,
        policy: FetchPolicy | None = None,
    ) -> None:
        self.policy = policy or FetchPolicy(allow=HostRules.parse([]), deny=HostRules.parse([]))
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_total_bytes = max_total_bytes
        self.max_file_bytes = max_file_bytes
        self.timeout = timeout
        self.stats = CacheStats()
        self._lock = threading.Lock()

    def path_for(self, url: str) -> Path:
        return self.folder / f"{hashlib.sha256(url.encode()).hexdigest()[:40]}.safetensors"

    def get(self, url: str, *, keep: frozenset[Path] = frozenset()) -> Path:
        """The cached file for `url`, downloading it first if needed. `keep`: files the
        current request also uses, never evicted to make room. Raises LoraError."""
        path = self.path_for(url)
        if path.is_file():
            _touch(path)
            with self._lock:
                self.stats.hits += 1
            return path
        with self._lock:
            self.stats.misses += 1
        download(url, path, policy=self.policy, max_bytes=self.max_file_bytes, timeout=self.timeout)
        self.evict(keep=keep | {path})
        return path

    def evict(self, *, keep: frozenset[Path] = frozenset()) -> None:
        entries = []
        for entry in self.folder.glob("*.safetensors"):
            with contextlib.suppress(OSError):
                stat = entry.stat()
                entries.append((stat.st_atime_ns, stat.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries):
            if total <= self.max_total_bytes:
                break
            if entry in keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                total -= size
                with self._lock:
                    self.stats.evicted += 1


def download(url: str, path: Path, *, policy: FetchPolicy, max_bytes: int, timeout: float) -> None:
    """Stream `url` into `path` (atomically), at most `max_bytes`, within `timeout` seconds in
    all (lookups, redirects, connections and every read), under the server's fetch policy
    (server/fetch.py: every redirect checked again, each connection to the checked address).
    The body goes to disk, not memory (LoRAs can be gigabytes), so fetch.fetch is not used.
    Called from the worker's threads, which run no event loop. Raises LoraError naming `url`."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        asyncio.run(asyncio.wait_for(_download(url, partial, policy, max_bytes, timeout), timeout))
        os.replace(partial, path)
    except FetchRefused as exc:
        raise LoraError(url, f"refused by this server's fetch policy: {exc}") from exc
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        raise LoraError(url, f"download took longer than {timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise LoraError(url, f"download failed: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()


async def _download(url: str, partial: Path, policy: FetchPolicy, max_bytes: int, timeout: float) -> None:
    source = url  # errors name the URL as the request gave it, also after redirects
    async with pinned_client(timeout) as client:
        response, _final_url = await get_following_redirects(client, url, policy)
        try:
            if response.status_code != 200:
                raise LoraError(source, f"download failed: HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise LoraError(
                    source, f"is {_mb(int(declared))}, above this server's limit of {_mb(max_bytes)}"
                )
            size = 0
            with open(partial, "wb") as handle:
                async for chunk in response.aiter_bytes(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise LoraError(source, f"is larger than this server's limit of {_mb(max_bytes)}")
                    handle.write(chunk)
        finally:
            await response.aclose()


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def _mb(size: int) -> str:
    return f"{size / 1024**2:.1f} MB"
