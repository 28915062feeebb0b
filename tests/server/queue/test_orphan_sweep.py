"""The orphan sweep (server/api/maintenance.py) on every backend: generated images that no record
references and that are older than the safety age are deleted; referenced images, young
orphans and uploads are kept, and each file is checked once."""

from __future__ import annotations

import os
import time
from pathlib import Path

from server.api.maintenance import CLOCK_SKEW_MARGIN, ORPHAN_MIN_AGE, OrphanSweep
from server.storage import LocalStorage
from tests.server.conftest import api_settings, run_api_server
from tests.server.queue.conftest import QueueBackend, make_job, make_result
from tests.support import wait_until

HOUR = 3600.0


def aged(storage: LocalStorage, name: str, seconds: float) -> Path:
    """Make a stored file look written `seconds` ago."""
    path = storage.files_dir / name
    when = time.time() - seconds
    os.utime(path, (when, when))
    return path


def completed_with(backend: QueueBackend, file_name: str) -> None:
    api, worker = backend.open("api"), backend.open("worker")
    rid = api.submit(make_job()).id
    assert worker.claim("w1", timeout=0) is not None
    assert worker.complete(rid, "w1", make_result(file_name=file_name))


def test_only_old_unreferenced_generated_images_are_deleted(backend: QueueBackend, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "files")
    referenced = storage.save(b"png", "png")
    orphan = storage.save(b"png", "png")
    young_orphan = storage.save(b"png", "png")
    received = storage.temp_path()
    received.write_bytes(b"upload")
    upload = storage.store_upload(received, "image/png", "cat.png", lifetime=7 * 24 * HOUR)
    interrupted = storage.files_dir / f".{orphan}.partial"  # a `save` that never finished
    interrupted.write_bytes(b"half")
    completed_with(backend, referenced)
    for name in (referenced, orphan, upload, interrupted.name):
        aged(storage, name, 2 * HOUR)
    aged(storage, young_orphan, ORPHAN_MIN_AGE - 60)

    sweep = OrphanSweep(backend.open("api"), storage)
    assert sweep.run() == 1
    assert storage.path(orphan) is None and not interrupted.exists()
    assert storage.path(referenced) is not None
    assert storage.path(young_orphan) is not None
    assert storage.file_info(upload) is not None

    # Files already checked are not checked again; the young orphan is, once it is old.
    assert sweep.run() == 0
    assert sweep.run(now=time.time() + 120) == 1
    assert storage.path(young_orphan) is None and storage.path(referenced) is not None


def test_an_incremental_sweep_reads_only_results_completed_since_the_new_files(
    backend: QueueBackend, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "files")
    queue = backend.open("api")
    sweep = OrphanSweep(queue, storage)
    assert sweep.run(now=time.time() - HOUR) == 0  # the first sweep of a process, an hour ago
    asked: list[float] = []
    result_file_names = queue.result_file_names

    def recorded(completed_since: float) -> set[str]:
        asked.append(completed_since)
        return result_file_names(completed_since)

    queue.result_file_names = recorded  # type: ignore[method-assign]
    assert sweep.run(now=time.time() - HOUR + 60) == 0 and asked == []  # no new old file: no read
    name = storage.save(b"png", "png")
    completed_with(backend, name)
    written = aged(storage, name, HOUR + 30).stat().st_mtime
    assert sweep.run() == 0 and storage.path(name) is not None
    assert asked == [written - CLOCK_SKEW_MARGIN]  # from the oldest new file on, not from the start


def test_the_api_sweeps_orphans_from_its_maintenance_loop(tmp_path: Path) -> None:
    settings = api_settings(tmp_path / "data")
    storage = LocalStorage(settings.files_dir)
    orphan, young = storage.save(b"png", "png"), storage.save(b"png", "png")
    aged(storage, orphan, 2 * HOUR)
    with run_api_server(settings):
        wait_until(lambda: storage.path(orphan) is None, 10, "the orphan to be deleted")
        assert storage.path(young) is not None
