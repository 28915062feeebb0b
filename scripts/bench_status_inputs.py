#!/usr/bin/env python
"""Status polls with image-to-image jobs waiting (not a test).

A status poll must cost the same whatever the queued jobs carry: input images are stored
apart from the job's JSON and only the worker that claims a job reads them. This script
starts two API servers alone (`flux-server api` with the tiny model, no worker, SQLite
each), submits N text-to-image jobs to one and N image-to-image jobs with ~1 MP JPEG inputs
to the other, then measures status requests per second on the job in the middle of each
queue, alternating between the two for a few rounds, and reports the median round of each.

    .venv/bin/python scripts/bench_status_inputs.py [--jobs 200] [--seconds 5] [--rounds 3] [--out f.json]

The load generator is `wrk -t1 -c32` (installed from Debian when missing), else httpx.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
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


def fill(base: str, path: str, body: dict, jobs: int) -> tuple[str, float]:
    """Submit `jobs` jobs; the status URL of the one in the middle, and the mean submit time."""
    with httpx.Client(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        ids = []
        for _ in range(jobs):
            response = client.post(path, json=body)
            response.raise_for_status()
            ids.append(response.json()["request_id"])
        submit_ms = (time.perf_counter() - started) / jobs * 1000
    return f"{base}/fal-ai/flux/requests/{ids[len(ids) // 2]}/status?logs=1", submit_ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs waiting in each phase")
    parser.add_argument("--seconds", type=int, default=5, help="of each status measurement")
    parser.add_argument("--rounds", type=int, default=3, help="status measurements per kind, alternating")
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
    with tempfile.TemporaryDirectory(prefix="flux-bench-inputs-") as tmp, contextlib.ExitStack() as servers:
        targets = {}
        for name, (path, body) in phases.items():
            data_dir = Path(tmp) / name
            data_dir.mkdir()
            base = servers.enter_context(running_server(data_dir, workers=0))
            target, submit_ms = fill(base, path, body, args.jobs)
            database = sum(f.stat().st_size for f in data_dir.glob("queue.sqlite3*"))
            targets[name] = target
            results[name] = {"submit_ms_mean": round(submit_ms, 1), "database_bytes": database, "rounds": []}
        # Alternating rounds on both servers at once: a change in the machine's other load
        # (a shared box) falls on both kinds alike. The median round is reported.
        for _ in range(args.rounds):
            for name, target in targets.items():
                results[name]["rounds"].append(status_rate(target, args.seconds, args.jobs))
        for name in targets:
            rates = sorted(r["rps"] for r in results[name]["rounds"])
            results[name]["rps"] = rates[len(rates) // 2]
    ratio = results["image-to-image"]["rps"] / results["text-to-image"]["rps"]
    results["image_to_image_over_text_to_image"] = round(ratio, 3)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
