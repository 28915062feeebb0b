"""A full disk, on a real small filesystem: a tmpfs mounted as the data directory of a real API
server (the tests run as root, as CI does), filled with a file.

Below the free-space floor every protocol refuses submits and fal storage uploads with 507 in
its own error shape while reads go on, and they are accepted again once space returns. With
no floor, the disk fills up for real: SQLite's "database or disk is full" and ENOSPC while an
upload body is written answer 507 too, and every request answered 200 is stored while none
answered 507 is. Faults a tmpfs cannot cause on cue (a quota, a reservation's write,
PostgreSQL's disk_full) are injected.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psycopg
import pytest

from server.disk import DISK_FULL_MESSAGE, DiskFull, FreeSpace, free_bytes, is_disk_full
from server.jobs import Status
from server.storage import LocalStorage
from tests.server.conftest import ApiServer, api_settings, png_bytes, run_api_server
from tests.support import error_body, wait_until

MIB = 1024 * 1024
FLOOR = 2 * MIB
FAL_SUBMIT = "/fal-ai/flux/dev"
PROXY_TARGET = {"x-fal-target-url": "https://queue.fal.run/fal-ai/flux/dev"}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(
            "these tests need a real small filesystem: `mount -t tmpfs` failed "
            f"({mounted.stderr.strip() or mounted.returncode}); run them as root, as CI does"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `disk` (0: none at all)."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as out:
        while (free := free_bytes(disk)) > leave:
            try:
                out.write(b"\0" * min(free - leave, 4 * MIB) if leave else b"\0" * min(free, 4 * MIB))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler


def assert_fal_507(response: httpx.Response, what: str = "") -> None:
    """fal's (and BFL's) shape: {"detail": message}."""
    assert response.status_code == 507, f"{what}: {response.text}"
    assert error_body(response) == {"detail": DISK_FULL_MESSAGE}, what


def assert_openai_507(response: httpx.Response, what: str = "") -> None:
    assert response.status_code == 507, f"{what}: {response.text}"
    assert error_body(response) == {
        "error": {
            "message": DISK_FULL_MESSAGE,
            "type": "server_error",
            "param": None,
            "code": "insufficient_storage",
        }
    }, what


def submits(server: ApiServer) -> dict[str, httpx.Response]:
    """One submit on every protocol and way in."""
    client = server.client
    edit_files = {"image": ("in.png", png_bytes(64, 64), "image/png")}
    return {
        "fal queue": client.post(FAL_SUBMIT, json={"prompt": "a cat"}),
        "fal run": client.post(f"/run{FAL_SUBMIT}", json={"prompt": "a cat"}),
        "fal stream": client.post(f"/run{FAL_SUBMIT}/stream", json={"prompt": "a cat"}),
        "fal JS proxy": client.post("/api/fal/proxy", json={"prompt": "a cat"}, headers=PROXY_TARGET),
        "bfl": client.post("/v1/flux-dev", json={"prompt": "a cat"}),
        "openai generations": client.post("/v1/images/generations", json={"prompt": "a cat"}),
        "openai edits": client.post("/v1/images/edits", data={"prompt": "a cat"}, files=edit_files),
    }


def assert_all_refused(server: ApiServer) -> None:
    for way, response in submits(server).items():
        if way.startswith("openai"):
            assert_openai_507(response, way)
        else:
            assert_fal_507(response, way)


def test_below_the_floor_submits_and_uploads_are_507_reads_go_on_and_space_returning_reopens(
    small_disk: Path,
) -> None:
    settings = api_settings(small_disk, min_free_disk_bytes=FLOOR)
    with run_api_server(settings) as server:
        client = server.client
        done_id = server.submit()["request_id"]
        server.complete(server.claim(done_id))
        image_url = client.get(f"/fal-ai/flux/requests/{done_id}").json()["images"][0]["url"]
        started = client.post("/storage/upload/initiate", json={"content_type": "image/png"}).json()
        multipart = client.post("/files/upload/multipart").json()

        filler = fill(small_disk, leave=FLOOR // 2)
        wait_until(lambda: client.post("/storage/auth/token").status_code == 507, 10, "the floor to be seen")

        assert_all_refused(server)
        assert server.worker.depth() == 0  # nothing refused was stored
        assert_fal_507(client.post("/storage/auth/token"))
        assert_fal_507(client.post("/storage/upload/initiate", json={"content_type": "image/png"}))
        assert_fal_507(client.post("/files/upload", content=b"x" * 1000))
        assert_fal_507(client.post("/files/upload/multipart"))
        assert_fal_507(httpx.put(started["upload_url"], content=b"x" * 1000))
        part_url = f"{multipart['access_url']}/multipart/{multipart['uploadId']}/1"
        assert_fal_507(httpx.put(part_url, content=b"x" * 1000))
        sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        with sdk, pytest.raises(openai.APIStatusError) as refused:
            sdk.images.generate(prompt="a cat", model="flux.1-dev")
        assert refused.value.status_code == 507 and refused.value.code == "insufficient_storage"
        assert refused.value.type == "server_error" and DISK_FULL_MESSAGE in refused.value.message

        # Reads go on: status, result, the image, health.
        status = client.get(f"/fal-ai/flux/requests/{done_id}/status")
        assert status.status_code == 200 and status.json()["status"] == "COMPLETED"
        assert client.get(f"/fal-ai/flux/requests/{done_id}").status_code == 200
        assert client.get(image_url).status_code == 200

        filler.unlink()
        accepted = wait_until(
            lambda: (
                (response := client.post(FAL_SUBMIT, json={"prompt": "a cat"})).status_code == 200
                and response
            ),
            10,
            "submits to be accepted again",
        )
        assert server.worker.get(accepted.json()["request_id"]).status is Status.IN_QUEUE
        assert httpx.put(started["upload_url"], content=png_bytes(8, 8)).status_code == 200
        assert httpx.put(part_url, content=b"x" * 1000).status_code == 200


def test_a_disk_that_fills_up_answers_507_and_keeps_exactly_what_it_accepted(small_disk: Path) -> None:
    settings = api_settings(small_disk, min_free_disk_bytes=0)  # no floor: the disk fills for real
    with run_api_server(settings) as server:
        client = server.client
        started = client.post("/storage/upload/initiate", json={"content_type": "image/png"}).json()
        filler = fill(small_disk, leave=256 * 1024)  # room for a few submits, then none

        # An upload body that does not fit: 507, and nothing of it stays.
        assert_fal_507(httpx.put(started["upload_url"], content=b"x" * (2 * MIB)))
        assert_fal_507(client.post("/files/upload", content=b"x" * (2 * MIB)))
        assert list((settings.files_dir / ".tmp").iterdir()) == []

        # Submits until the queue's database has no room left (its WAL may still have some).
        # Large jobs first, then jobs as small as the ones below: a page with room for a small
        # row may remain after the large ones are refused.
        accepted, refused = [], []
        for prompt in ("a cat " * 600, "a cat"):
            refused_in_a_row = 0
            for _ in range(500):
                response = client.post(FAL_SUBMIT, json={"prompt": prompt})
                if response.status_code == 200:
                    accepted.append(response.json()["request_id"])
                    refused_in_a_row = 0
                else:
                    assert_fal_507(response)
                    refused.append(response)
                    refused_in_a_row += 1
                    if refused_in_a_row == 3:
                        break
        assert refused, "the full disk never refused a submit"
        assert_all_refused(server)
        # Every 200 is stored, nothing answered 507 is.
        assert server.worker.depth() == len(accepted)
        for request_id in accepted:
            assert client.get(f"/fal-ai/flux/requests/{request_id}/status").json()["status"] == "IN_QUEUE"

        filler.unlink()
        assert server.submit()["request_id"]
        assert server.worker.depth() == len(accepted) + 1
        assert httpx.put(started["upload_url"], content=png_bytes(8, 8)).status_code == 200


# --- injected faults ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with run_api_server(api_settings(tmp_path_factory.mktemp("disk"), min_free_disk_bytes=0)) as server:
        yield server


def test_the_queue_database_full_is_507_on_every_protocol_and_stores_nothing(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.drain()

    def database_full(jobs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(server.app.state.async_queue.sync, "submit_many", database_full)
    assert_all_refused(server)
    monkeypatch.undo()
    assert server.worker.depth() == 0
    assert server.submit()["request_id"]
    server.drain()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_an_upload_reservation_that_cannot_be_written_is_507(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(LocalStorage, "reserve", no_space)
    assert_fal_507(server.client.post("/storage/upload/initiate", json={"content_type": "image/png"}))
    assert_fal_507(server.client.post("/files/upload/multipart"))
    assert_fal_507(server.client.post("/files/upload", content=b"x" * 100))
    monkeypatch.undo()
    assert server.client.post("/storage/upload/initiate", json={}).status_code == 200


def test_an_unrelated_storage_error_stays_a_500(server: ApiServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(LocalStorage, "reserve", broken)
    response = server.client.post("/storage/upload/initiate", json={})
    assert response.status_code == 500


def test_is_disk_full_knows_every_way_a_full_disk_is_reported() -> None:
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert is_disk_full(psycopg.errors.DiskFull("could not extend file"))
    assert is_disk_full(DiskFull())
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("storing the output failed") from cause
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(ValueError("no"))


def test_free_space_is_measured_at_most_once_a_second_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    free = {"bytes": 10 * MIB}
    measured: list[Path] = []

    def fake_free_bytes(path: Path) -> int:
        measured.append(path)
        return free["bytes"]

    monkeypatch.setattr("server.disk.free_bytes", fake_free_bytes)
    now = [100.0]
    space = FreeSpace([tmp_path / "files", tmp_path], FLOOR, clock=lambda: now[0])
    for _ in range(1000):
        space.check()
    assert len(measured) == 2  # two paths, measured once
    free["bytes"] = MIB
    space.check()  # still the cached measurement
    now[0] += 1.0
    with pytest.raises(DiskFull):
        space.check()
    free["bytes"] = 3 * MIB
    now[0] += 1.0
    space.check()
    assert FreeSpace([tmp_path], 0).below_floor() is None  # 0: no floor at all
