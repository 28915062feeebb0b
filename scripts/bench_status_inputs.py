#!/usr/bin/env python
"""Status polls with image-to-image jobs waiting (not a test).

A status poll must cost the same whatever the queued jobs carry: input images are stored
apart from the job's JSON and only the worker that claims a job reads them. This script
starts the API alone (`flux-server api` with the tiny model, no worker, SQLite), submits N
text-to-image jobs, measures status requests per second on the job in the middle, then does
the same on a fresh server with N image-to-image jobs whose inputs are ~1 MP JPEGs.

    .venv/bin/python scripts/bench_status_inputs.py [--jobs 200] [--seconds 5] [--out results.json]

The load generator is `wrk -t1 -c32` (installed from Debian when missing), else httpx.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import ensure_wrk, running_server, status_rate

TEXT_TO_IMAGE = ("/fal-ai/flux/dev", {"prompt": "bench", "image_size": {"width": 64, "height": 64}})


def photo_like_jpeg(side: int) -> bytes:
    """A `side` x `side` JPEG that compresses like a photo (smooth areas plus grain): about
    200 KB for 1024 px, 2 MB once decoded and stored as PNG."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC)).astype(np.int16)
    grain = rng.integers(-6, 7, (side, side, 3))
    image = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def image_to_image(side: int) -> tuple[str, dict]:
    uri = "data:image/jpeg;base64," + base64.b64encode(photo_like_jpeg(side)).decode()
    return "/fal-ai/flux/dev/image-to-image", {"prompt": "bench", "image_url": uri, "strength": 0.9}


def measure(data_dir: Path, path: str, body: dict, jobs: int, seconds: int) -> dict:
    with running_server(data_dir, workers=0) as base:
        with httpx.Client(base_url=base, timeout=60) as client:
            started = time.perf_counter()
            ids = []
            for _ in range(jobs):
                response = client.post(path, json=body)
                response.raise_for_status()
                ids.append(response.json()["request_id"])
            submit_seconds = time.perf_counter() - started
        target = f"{base}/fal-ai/flux/requests/{ids[len(ids) // 2]}/status?logs=1"
        result = status_rate(target, seconds, jobs)
    result["submit_ms_mean"] = submit_seconds / jobs * 1000
    result["database_bytes"] = sum(f.stat().st_size for f in data_dir.glob("queue.sqlite3*"))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs waiting in each phase")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--image-side", type=int, default=1024, help="input images are side x side")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    ensure_wrk()

    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "python": platform.python_version(),
        "queue": f"SQLite {sqlite3.sqlite_version}",
        "jobs": args.jobs,
    }
    phases = {"text-to-image": TEXT_TO_IMAGE, "image-to-image": image_to_image(args.image_side)}
    with tempfile.TemporaryDirectory(prefix="flux-bench-inputs-") as tmp:
        for name, (path, body) in phases.items():
            data_dir = Path(tmp) / name
            data_dir.mkdir()
            results[name] = measure(data_dir, path, body, args.jobs, args.seconds)
    ratio = results["image-to-image"]["rps"] / results["text-to-image"]["rps"]
    results["image_to_image_over_text_to_image"] = round(ratio, 3)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
