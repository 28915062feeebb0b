"""The worker's side of a job's LoRAs: specs, the 422 job error, the claim preference."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.lora.errors import LoraError
from server.config import Settings
from server.jobs import Job, LoraRef
from server.storage import LocalStorage
from server.worker.lora.jobs import LORA_ERROR_TYPE, JobLoras

SAFETENSORS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "


@pytest.fixture
def loras(tmp_path: Path) -> JobLoras:
    (tmp_path / "library").mkdir()
    for name in ("ink", "oil"):
        (tmp_path / "library" / f"{name}.safetensors").write_bytes(SAFETENSORS)
    settings = Settings(data_dir=tmp_path / "data", lora_dir=tmp_path / "library", lora_max_per_request=2)
    return JobLoras(settings, LocalStorage(settings.files_dir))


def job(*paths: str) -> Job:
    return Job(width=64, height=64, loras=tuple(LoraRef(path=p, scale=0.5) for p in paths))


def test_specs_resolve_every_lora_with_its_scale(loras: JobLoras, tmp_path: Path) -> None:
    specs = loras.specs(job("ink", "oil.safetensors"))
    assert [(s.name, s.file, s.scale) for s in specs] == [
        ("ink", (tmp_path / "library" / "ink.safetensors").resolve(), 0.5),
        ("oil.safetensors", (tmp_path / "library" / "oil.safetensors").resolve(), 0.5),
    ]
    with pytest.raises(LoraError, match="at most 2 LoRAs per request"):
        loras.specs(job("ink", "oil", "ink"))
    limits = loras.limits()
    assert (limits.max_rank, limits.max_per_request) == (128, 2)


def test_the_job_error_is_fals_422_at_the_loras_path(loras: JobLoras) -> None:
    bad = job("ink", "missing")
    with pytest.raises(LoraError) as caught:
        loras.specs(bad)
    error = loras.error(bad, caught.value)
    assert (error.status_code, error.error_type) == (422, LORA_ERROR_TYPE)
    [detail] = error.body["detail"]  # type: ignore[index]
    assert detail["loc"] == ["body", "loras", 1, "path"] and detail["input"] == "missing"
    assert detail["msg"] == error.message and error.message.startswith("LoRA 'missing': not found")
    other = loras.error(bad, LoraError("ink, missing", "together too large"))
    assert other.body["detail"][0]["loc"] == ["body", "loras"]  # type: ignore[index]


def test_the_preference_wants_jobs_whose_loras_are_all_held(loras: JobLoras, tmp_path: Path) -> None:
    assert loras.preference(lambda: []) is None  # holds nothing: no preference at all
    ink = str((tmp_path / "library" / "ink.safetensors").resolve())
    url = "http://files.lan/style.safetensors"
    cached = loras.cache.path_for(url)
    cached.write_bytes(SAFETENSORS)
    prefer = loras.preference(lambda: [ink, str(cached.resolve())])
    assert prefer is not None
    assert prefer.wants(job("ink"))
    assert prefer.wants(job("ink", url))
    assert not prefer.wants(job("ink", "oil"))  # oil is not loaded
    assert not prefer.wants(job("http://files.lan/other.safetensors"))  # not even downloaded
    assert not prefer.wants(job())  # a plain job is anyone's
    assert loras.cache.stats.hits == loras.cache.stats.misses == 0  # peeking counts nothing
