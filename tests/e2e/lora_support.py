"""What the LoRA end-to-end tests serve: LoRA files for the tiny model in every source a studio
uses (a LAN file server, a LoRA folder, a local Hugging Face cache, this server's files)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.lora.tiny_loras import write_lora


class LanFileServer:
    """Plain HTTP on loopback, as a studio's file server: GET /<name> -> files[name] or 404.
    It also takes webhooks: every POST body is kept in `posted` (path, JSON)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        self.posted: list[tuple[str, dict]] = []
        lan = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: object) -> None:
                pass

            def do_GET(self) -> None:
                lan.requests.append(self.path)
                body = lan.files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                lan.posted.append((self.path, json.loads(data)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def tiny_transformer(tiny_model_dir: Path) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_model_dir / "transformer")


def add_to_hf_cache(cache: Path, repo: str, name: str, data: bytes) -> None:
    """huggingface_hub's cache layout: blobs by hash, a snapshot of symlinks, refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = folder / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))


def write_bad_loras(folder: Path) -> dict[str, Path]:
    """One file per way a LoRA can be wrong (see the bad-LoRA test for the expected errors)."""
    folder.mkdir(parents=True, exist_ok=True)
    junk = folder / "junk.safetensors"
    junk.write_bytes(b"<html>not a LoRA</html>" * 10)
    wide = folder / "wide.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
        },
        str(wide),
    )
    big = folder / "big.safetensors"
    save_file(
        {
            "transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
            "transformer.x_embedder.lora_B.weight": torch.zeros(32, 4),
        },
        str(big),
        metadata={"padding": "x" * 300_000},
    )
    return {"junk": junk, "wide": wide, "big": big}


def write_good_loras(folder: Path, transformer: torch.nn.Module) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "lan": write_lora(folder / "lan.safetensors", transformer, seed=2),
        "style": write_lora(folder / "style.safetensors", transformer, seed=1),
        "kohya": write_lora(folder / "kohya.safetensors", transformer, layout="kohya", seed=11),
        "ink": write_lora(folder / "ink.safetensors", transformer, layout="xlabs", seed=12),
        "upload": write_lora(folder / "upload.safetensors", transformer, seed=13),
        "rank32": write_lora(folder / "rank32.safetensors", transformer, seed=14, rank=32),
    }
