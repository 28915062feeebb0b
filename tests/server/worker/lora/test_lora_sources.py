"""LoRA sources with no internet: a LAN http server on loopback, --lora-dir, a local Hugging
Face cache built in huggingface_hub's layout, and this server's own uploaded files."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from models.lora.errors import LoraError
from server.config import Settings
from server.fetch import FetchPolicy, HostRules
from server.storage import LocalStorage, file_url
from server.worker.lora.cache import DownloadCache
from server.worker.lora.sources import LoraResolver, resolve_all
from tests.support import LOOPBACK_OUTBOUND

SAFETENSORS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + b"\0" * 64  # header only; bytes matter here


class LanServer:
    """A studio file server on loopback: GET /<name> serves `files[name]`, counts requests;
    /slow never finishes its body; /trickle sends a byte every 0.1 s; /missing is a 404."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.release = threading.Event()
        lan = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                lan.requests.append(self.path)
                name = self.path.lstrip("/")
                if name == "slow":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"x" * 10)
                    self.wfile.flush()
                    lan.release.wait(10)
                    return
                if name == "trickle":  # every read is quick; the whole download is not
                    self.send_response(200)
                    self.send_header("Content-Length", "500")
                    self.end_headers()
                    for _ in range(500):
                        if lan.release.wait(0.1):
                            return
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    return
                if name == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "/a.safetensors")
                    self.end_headers()
                    return
                body = lan.files.get(name)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def lan() -> Iterator[LanServer]:
    server = LanServer()
    yield server
    server.close()


LOOPBACK_OPEN = FetchPolicy.from_settings(Settings(outbound_allow=LOOPBACK_OUTBOUND))


def make_resolver(tmp_path: Path, **cache: float) -> LoraResolver:
    options = {"max_total_bytes": 10_000, "max_file_bytes": 1_000, "timeout": 5.0, **cache}
    return LoraResolver(
        # The LAN server of these tests is on loopback, closed by default: opened explicitly.
        cache=DownloadCache(tmp_path / "cache", policy=LOOPBACK_OPEN, **options),  # type: ignore[arg-type]
        storage=LocalStorage(tmp_path / "files"),
        lora_dir=tmp_path / "library",
        hf_cache_dir=tmp_path / "hf",
    )


def message(exc: pytest.ExceptionInfo[LoraError]) -> str:
    return str(exc.value)


# --- LAN URLs and the download cache --------------------------------------------------------


def test_a_url_is_downloaded_once(tmp_path: Path, lan: LanServer) -> None:
    lan.files["a.safetensors"] = SAFETENSORS
    resolver = make_resolver(tmp_path)
    first = resolver.resolve(f"{lan.url}/a.safetensors")
    second = resolver.resolve(f"{lan.url}/a.safetensors")
    assert first.file == second.file and first.source == "download"
    assert first.file.read_bytes() == SAFETENSORS
    assert lan.requests == ["/a.safetensors"]
    assert (resolver.cache.stats.hits, resolver.cache.stats.misses) == (1, 1)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".partial")]


def test_redirects_are_followed(tmp_path: Path, lan: LanServer) -> None:
    lan.files["a.safetensors"] = SAFETENSORS
    assert make_resolver(tmp_path).resolve(f"{lan.url}/redirect").file.read_bytes() == SAFETENSORS


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path, lan: LanServer) -> None:
    for name in "abc":
        lan.files[f"{name}.safetensors"] = name.encode() * 400
    resolver = make_resolver(tmp_path, max_total_bytes=900)
    a = resolver.resolve(f"{lan.url}/a.safetensors").file
    b = resolver.resolve(f"{lan.url}/b.safetensors").file
    os.utime(a, ns=(1, a.stat().st_mtime_ns))  # a: long unused
    resolver.resolve(f"{lan.url}/b.safetensors")  # b: just used
    c = resolver.resolve(f"{lan.url}/c.safetensors").file
    assert not a.exists() and b.exists() and c.exists()
    assert resolver.cache.stats.evicted == 1
    resolver.resolve(f"{lan.url}/a.safetensors")  # downloaded again
    assert lan.requests.count("/a.safetensors") == 2


def test_a_cache_hit_keeps_the_modification_time(tmp_path: Path, lan: LanServer) -> None:
    """The runtime's in-memory cache keys on (path, size, mtime): a hit must not change it."""
    lan.files["a.safetensors"] = SAFETENSORS
    resolver = make_resolver(tmp_path)
    path = resolver.resolve(f"{lan.url}/a.safetensors").file
    mtime = path.stat().st_mtime_ns
    resolver.resolve(f"{lan.url}/a.safetensors")
    assert path.stat().st_mtime_ns == mtime


def test_download_failures_name_the_lora(tmp_path: Path, lan: LanServer) -> None:
    resolver = make_resolver(tmp_path, timeout=0.5)
    with pytest.raises(LoraError) as caught:
        resolver.resolve(f"{lan.url}/missing")
    assert message(caught) == f"LoRA '{lan.url}/missing': download failed: HTTP 404"
    lan.files["big.safetensors"] = b"x" * 5000
    with pytest.raises(LoraError, match=r"is 0.0 MB, above this server's limit"):
        resolver.resolve(f"{lan.url}/big.safetensors")
    with pytest.raises(LoraError, match=r"download took longer than 0.5 s"):
        resolver.resolve(f"{lan.url}/slow")
    with pytest.raises(LoraError, match=r"download failed: ConnectError"):
        resolver.resolve("http://127.0.0.1:1/a.safetensors")
    assert not list((tmp_path / "cache").iterdir())


def test_the_fetch_policy_applies_to_every_hop(tmp_path: Path, lan: LanServer) -> None:
    lan.files["a.safetensors"] = SAFETENSORS
    resolver = make_resolver(tmp_path)
    resolver.cache.policy = FetchPolicy(
        allow=HostRules.parse([]), deny=HostRules.parse(["127.0.0.0/8"]), open=HostRules.parse(["127.0.0.1"])
    )
    with pytest.raises(LoraError) as caught:
        resolver.resolve(f"{lan.url}/a.safetensors")
    assert message(caught) == (
        f"LoRA '{lan.url}/a.safetensors': refused by this server's fetch policy: "
        "127.0.0.1 (127.0.0.1) is on this server's deny list"
    )
    assert lan.requests == []
    with pytest.raises(LoraError, match=r"refused by this server.s fetch policy: .* link-local"):
        resolver.resolve("http://169.254.10.10/a.safetensors")


def test_loopback_is_closed_to_lora_urls_by_default(tmp_path: Path, lan: LanServer) -> None:
    lan.files["a.safetensors"] = SAFETENSORS
    shipped = DownloadCache(tmp_path / "cache", max_total_bytes=10_000, max_file_bytes=1_000, timeout=5.0)
    resolver = make_resolver(tmp_path)
    resolver.cache = shipped
    with pytest.raises(LoraError, match=r"refused by this server.s fetch policy: 127\.0\.0\.1, a loopback"):
        resolver.resolve(f"{lan.url}/a.safetensors")
    # Opening the address 127.0.0.1 does not open the name localhost.
    resolver.cache.policy = FetchPolicy.from_settings(Settings(outbound_allow=["127.0.0.1"]))
    port = lan.url.rsplit(":", 1)[1]
    with pytest.raises(LoraError, match="loopback name"):
        resolver.resolve(f"http://localhost:{port}/a.safetensors")
    assert lan.requests == []
    assert resolver.resolve(f"{lan.url}/a.safetensors").source == "download"


def test_a_download_has_one_deadline_for_all_its_reads(tmp_path: Path, lan: LanServer) -> None:
    resolver = make_resolver(tmp_path, timeout=1.0)
    started = time.monotonic()
    with pytest.raises(LoraError, match=r"download took longer than 1 s"):
        resolver.resolve(f"{lan.url}/trickle")
    assert time.monotonic() - started < 3.0
    assert not list((tmp_path / "cache").iterdir())


# --- the LoRA folder --------------------------------------------------------------------------


def test_names_inside_the_lora_folder(tmp_path: Path) -> None:
    resolver = make_resolver(tmp_path)
    library = tmp_path / "library"
    (library / "team").mkdir(parents=True)
    (library / "style.safetensors").write_bytes(SAFETENSORS)
    (library / "team" / "hero.safetensors").write_bytes(SAFETENSORS)
    assert resolver.resolve("style").file == (library / "style.safetensors").resolve()
    assert resolver.resolve("style.safetensors").source == "lora-dir"
    assert resolver.resolve("team/hero.safetensors").file == (library / "team" / "hero.safetensors").resolve()


def test_traversal_and_absolute_paths_are_refused(tmp_path: Path) -> None:
    resolver = make_resolver(tmp_path)
    (tmp_path / "library").mkdir()
    (tmp_path / "secret.safetensors").write_bytes(SAFETENSORS)
    (tmp_path / "library" / "link.safetensors").symlink_to(tmp_path / "secret.safetensors")
    for path in ("../secret.safetensors", "../secret", "team/../../secret.safetensors", "link.safetensors"):
        with pytest.raises(LoraError, match="leads outside the LoRA folder"):
            resolver.resolve(path)
    with pytest.raises(LoraError, match="absolute paths are not accepted"):
        resolver.resolve(str(tmp_path / "secret.safetensors"))
    with pytest.raises(LoraError, match="file: URLs are not supported"):
        resolver.resolve(f"file://{tmp_path}/secret.safetensors")


def test_an_unknown_name(tmp_path: Path) -> None:
    (tmp_path / "library").mkdir()
    with pytest.raises(LoraError) as caught:
        make_resolver(tmp_path).resolve("nothing here")
    assert "not found in the LoRA folder" in message(caught)


# --- the local Hugging Face cache ---------------------------------------------------------------


def add_to_hf_cache(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """huggingface_hub's cache layout: blobs by hash, snapshots of symlinks, refs -> commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    for name, data in files.items():
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return folder / "snapshots" / commit


def test_repo_ids_from_the_local_hf_cache(tmp_path: Path) -> None:
    resolver = make_resolver(tmp_path)
    snapshot = add_to_hf_cache(tmp_path / "hf", "studio/ink-style", {"ink.safetensors": SAFETENSORS})
    add_to_hf_cache(
        tmp_path / "hf", "studio/pack", {"a.safetensors": SAFETENSORS, "b.safetensors": SAFETENSORS + b"b"}
    )
    found = resolver.resolve("studio/ink-style")
    assert found.source == "hf-cache" and found.file == snapshot / "ink.safetensors"
    assert resolver.resolve("studio/pack/b.safetensors").file.read_bytes() == SAFETENSORS + b"b"
    url = "https://huggingface.co/studio/pack/resolve/main/a.safetensors"
    assert resolver.resolve(url).file.read_bytes() == SAFETENSORS
    with pytest.raises(LoraError, match=r"holds several safetensors files \(a.safetensors, b.safetensors\)"):
        resolver.resolve("studio/pack")
    with pytest.raises(LoraError, match=r"studio/other is not in the local Hugging Face cache"):
        resolver.resolve("studio/other")
    with pytest.raises(
        LoraError, match=r"c.safetensors of studio/pack is not in the local Hugging Face cache"
    ):
        resolver.resolve("studio/pack/c.safetensors")


def test_the_lora_folder_wins_over_a_repo_id(tmp_path: Path) -> None:
    resolver = make_resolver(tmp_path)
    add_to_hf_cache(tmp_path / "hf", "studio/ink", {"ink.safetensors": SAFETENSORS})
    (tmp_path / "library" / "studio").mkdir(parents=True)
    (tmp_path / "library" / "studio" / "ink.safetensors").write_bytes(SAFETENSORS)
    assert resolver.resolve("studio/ink").source == "lora-dir"


# --- this server's own files --------------------------------------------------------------------


def test_an_uploaded_file_is_read_from_disk(tmp_path: Path, lan: LanServer) -> None:
    resolver = make_resolver(tmp_path)
    received = tmp_path / "received"
    received.write_bytes(SAFETENSORS)
    name = resolver.storage.store_upload(received, "application/octet-stream", "style.safetensors", 3600)
    url = file_url(lan.url, name)  # the LAN server would 404: no HTTP request may happen
    found = resolver.resolve(url, own_base_urls=[lan.url])
    assert found.source == "upload" and found.file.read_bytes() == SAFETENSORS
    assert lan.requests == []
    with pytest.raises(LoraError, match="this server has no such file"):
        resolver.resolve(file_url(lan.url, "A" * 32 + ".safetensors"), own_base_urls=[lan.url])


def test_resolve_all_bounds_the_total_size(tmp_path: Path) -> None:
    resolver = make_resolver(tmp_path)
    (tmp_path / "library").mkdir()
    for name in ("a", "b"):
        (tmp_path / "library" / f"{name}.safetensors").write_bytes(b"x" * 600)
    specs = resolve_all(resolver, [("a", 1.0), ("b", 0.5)], own_base_urls=[], max_total_bytes=1200)
    assert [(s.name, s.scale) for s in specs] == [("a", 1.0), ("b", 0.5)]
    with pytest.raises(LoraError, match=r"LoRA 'a, b': together 0.0 MB, above this server's limit"):
        resolve_all(resolver, [("a", 1.0), ("b", 0.5)], own_base_urls=[], max_total_bytes=1000)
