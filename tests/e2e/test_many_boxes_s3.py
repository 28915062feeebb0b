"""Two boxes on one PostgreSQL queue that share no directory at all: each has its own data
directory, and the files live in one bucket (SeaweedFS, `--storage-url`). A file uploaded
through one box is the input of a job another box's worker runs; a result is read from the
bucket whichever box is asked; a box killed mid-job (its whole process group) loses nothing:
the other box's worker runs the job again and stores its image in the bucket."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import APP, BLOCKER_INPUT, DEV, cancel, small_input, submit, wait_completed, wait_for
from PIL import Image
from test_many_boxes import kill_box, start_box

from server.config import Settings
from server.queue.base import JobQueue
from server.queue.factory import open_queue
from server.tls import CertPaths
from tests.conftest import FluxServer
from tests.pg_server import PostgresServer
from tests.s3_server import S3Server

pytestmark = pytest.mark.timeout(300)


@dataclass
class Boxes:
    a: FluxServer
    b: FluxServer
    s3: S3Server
    bucket: str
    queue: JobQueue

    def worker_of(self, request_id: str) -> str:
        record = self.queue.get(request_id)
        assert record is not None
        return [e.message for e in record.logs if e.message.startswith("Started on ")][-1].split()[-1]

    def local_files(self) -> list[Path]:
        """Files either box wrote outside the bucket (upload bodies are spooled, then removed)."""
        found: list[Path] = []
        for box in (self.a, self.b):
            for folder in (box.data_dir / "files", box.data_dir / "upload-spool"):
                found += [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
        return found

    def read(self, url: str) -> bytes:
        assert url.startswith(f"{self.s3.endpoint}/{self.bucket}/shared/"), url
        answer = httpx.get(url)
        assert answer.status_code == 200, answer.text
        return answer.content


@pytest.fixture(scope="module")
def boxes(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    certs: CertPaths,
    postgres_server: PostgresServer,
    s3_server: S3Server,
) -> Iterator[Boxes]:
    root = tmp_path_factory.mktemp("s3-boxes")
    url = postgres_server.fresh_database_url()
    bucket = s3_server.fresh_bucket()
    options = {
        "url": url,
        "files": None,  # no shared folder
        "tiny_model_dir": tiny_model_dir,
        "certs": certs,
        "args": ["--storage-url", f"s3://{bucket}/shared"],
        "env": s3_server.env(),
    }
    a = start_box(root / "box-a", **options)  # type: ignore[arg-type]
    b = start_box(root / "box-b", **options)  # type: ignore[arg-type]
    queue = open_queue(Settings(data_dir=root / "observer", queue_url=url), role="test")
    state = Boxes(a, b, s3_server, bucket, queue)
    try:
        yield state
    finally:
        queue.close()
        for box in (state.a, state.b):
            with contextlib.suppress(AssertionError):
                box.stop(timeout=30)


def fal_client_at(box: FluxServer, certs: CertPaths, patch: pytest.MonkeyPatch) -> Any:
    patch.setenv("SSL_CERT_FILE", str(certs.bundle))
    import fal_client
    import fal_client.client

    for name, value in (
        ("QUEUE_URL_FORMAT", f"{box.base_url}/"),
        ("RUN_URL_FORMAT", f"{box.base_url}/run/"),
        ("REST_URL", box.base_url),
        ("CDN_URL", box.base_url),
    ):
        patch.setattr(fal_client.client, name, value)
    return fal_client.SyncClient(key="anything")


def test_an_upload_through_one_box_is_the_input_of_a_job_on_the_other(boxes: Boxes, certs: CertPaths) -> None:
    with pytest.MonkeyPatch.context() as patch:
        on_a = fal_client_at(boxes.a, certs, patch)
        url = on_a.upload_image(Image.new("RGB", (96, 64), (30, 120, 220)), format="png")
    body = {"prompt": "p", "image_url": url, "strength": 0.3, "num_inference_steps": 10, "seed": 3}
    with boxes.b.client() as client:
        request_id = submit(client, "fal-ai/flux/dev/image-to-image", body)["request_id"]
        wait_completed(client, request_id, app="fal-ai/flux")
        output = client.get(f"/fal-ai/flux/requests/{request_id}").json()
    image = Image.open(io.BytesIO(boxes.read(output["images"][0]["url"])))
    assert image.size == (96, 64)  # the uploaded picture was read from the bucket
    with boxes.a.client() as client:  # the other box answers with the same bucket URL
        again = client.get(f"/fal-ai/flux/requests/{request_id}").json()
    assert again["images"] == output["images"]
    assert boxes.local_files() == []


def test_results_of_jobs_submitted_on_one_box_are_read_from_the_bucket(boxes: Boxes) -> None:
    """Before the box is killed (the next test)."""
    ids: list[str] = []
    with boxes.a.client() as client:
        ids += [submit(client, DEV, small_input(seed=n))["request_id"] for n in range(4)]
    for request_id in ids:
        with boxes.a.client() as client:
            wait_completed(client, request_id, timeout=120)
            output = client.get(f"/{APP}/requests/{request_id}").json()
        assert Image.open(io.BytesIO(boxes.read(output["images"][0]["url"]))).size == (64, 64)


def test_a_job_on_a_killed_box_completes_on_the_other_into_the_bucket(boxes: Boxes) -> None:
    worker_a = f"{boxes.a.health().json()['box']}-w0"
    worker_b = f"{boxes.b.health().json()['box']}-w0"
    with boxes.a.client() as client:
        blockers = [submit(client, DEV, BLOCKER_INPUT)["request_id"] for _ in range(2)]
        for request_id in blockers:
            wait_for(client, request_id, lambda s: s["status"] == "IN_PROGRESS", timeout=60)
        on = {boxes.worker_of(request_id): request_id for request_id in blockers}
        cancel(client, on[worker_b])  # only box B's worker becomes free
        long_job = submit(client, DEV, {**BLOCKER_INPUT, "prompt": "survivor", "num_inference_steps": 6})
        request_id = long_job["request_id"]
        wait_for(client, request_id, lambda s: s["status"] == "IN_PROGRESS", timeout=60)
        assert boxes.worker_of(request_id) == worker_b
        kill_box(boxes.b)
        cancel(client, on[worker_a])  # box A's worker is free to take it over
        done = wait_completed(client, request_id, timeout=120)
        messages = [log["message"] for log in done["logs"]]
        assert "Worker lost; retrying" in messages and messages.count(f"Started on {worker_a}") == 1
        result = client.get(f"/{APP}/requests/{request_id}").json()
        for blocker in blockers:
            wait_completed(client, blocker, timeout=60)
    assert result["prompt"] == "survivor"
    data = boxes.read(result["images"][0]["url"])
    assert Image.open(io.BytesIO(data)).size == (768, 768)
    # Each request that completed has its images in the bucket, nowhere else.
    stored = {k.removeprefix("shared/") for k in boxes.s3.keys(boxes.bucket, "shared/") if "/." not in k}
    assert result["images"][0]["url"].split("?")[0].rsplit("/", 1)[-1] in stored
    assert boxes.local_files() == []
