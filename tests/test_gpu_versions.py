"""One set of versions for the GPU: constraints/gpu.txt, and everything that installs for a GPU
reading it (Dockerfile.cuda, the README's GPU install, scripts/setup.sh, the device proof's
wheels, checks and rehearsal). Parses the files; builds and downloads nothing."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_lock  # noqa: E402

LOCK = gpu_lock.read_lock()
# What the base image's Ubuntu release ships as python3.
UBUNTU_PYTHON = {"ubuntu22.04": "3.10", "ubuntu24.04": "3.12", "ubuntu26.04": "3.14"}


def text(path: str) -> str:
    return (REPO / path).read_text()


def test_the_lock_pins_the_compute_stack_exactly() -> None:
    for name in ("torch", "triton", "torchao", "diffusers", "transformers", "peft", "accelerate"):
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", LOCK.version(name)), name
    assert (LOCK.python, LOCK.cuda) == ("3.12", "13.0")
    # The device machine has these (its torch is 2.11.0+cu130); the rest travel as wheels.
    assert {p.name for p in LOCK.pins.values() if p.where == "device"} >= {"torch", "triton", "transformers"}
    assert {"torchao", "diffusers", "peft", "fastapi", "opentelemetry-api", "lazy-importer"} <= {
        p.name for p in LOCK.pins.values() if p.where == "carried"
    }


def test_the_lock_meets_the_projects_own_bounds() -> None:
    """A pin outside pyproject.toml's bounds would make `pip install -c` fail at build time."""
    project = tomllib.loads(text("pyproject.toml"))["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["accel"]]
    checked = []
    for line in requirements:
        requirement = Requirement(line)
        name = gpu_lock.normalise(requirement.name)
        if name in LOCK.pins:
            assert requirement.specifier.contains(LOCK.pins[name].version), (line, LOCK.pins[name])
            checked.append(name)
    assert {"torch", "diffusers", "transformers", "peft", "accelerate", "torchao", "fastapi"} <= set(checked)


def test_the_dockerfile_installs_the_lock_on_a_matching_base_with_what_triton_needs() -> None:
    dockerfile = text("Dockerfile.cuda")
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-(ubuntu\d+\.\d+)$", dockerfile, re.MULTILINE)
    assert base is not None
    assert f"{base[1]}.{base[2]}" == LOCK.cuda  # torch's CUDA build = the image's CUDA
    assert UBUNTU_PYTHON[base[3]] == LOCK.python  # the venv is made from Ubuntu's python3
    assert "COPY constraints/gpu.txt" in dockerfile
    installs = re.findall(r"pip install ([^\n]+)", dockerfile)
    assert installs and all(i.startswith("-c constraints/gpu.txt ") for i in installs), installs
    assert not re.search(r"\w==\d", dockerfile)  # no version of its own beside the lock's
    apt = re.search(r"apt-get install ([^\n]+)", dockerfile)
    assert apt is not None
    assert {"gcc", "python3-dev", "python3-venv"} <= set(apt[1].split())


def test_the_readme_and_setup_install_the_lock_and_name_its_versions() -> None:
    readme = text("README.md")
    assert 'pip install -c constraints/gpu.txt -e ".[accel]"' in readme
    assert f"python{LOCK.python} -m venv" in readme
    gpu_part = readme[readme.index("## On a GPU box") : readme.index("## In a browser")]
    assert set(re.findall(r"torch (\d+\.\d+\.\d+)", gpu_part)) == {LOCK.version("torch")}
    assert set(re.findall(r"CUDA (\d+\.\d+)", gpu_part)) == {LOCK.cuda}
    assert "gcc python3-dev" in gpu_part
    assert '"${CONSTRAINTS[@]}"' in text(
        "scripts/setup.sh"
    ) and "CONSTRAINTS=(-c constraints/gpu.txt)" in text("scripts/setup.sh")


@pytest.mark.parametrize(
    "script", ["scripts/make_device_wheels.sh", "scripts/gpu_proof.sh", "scripts/rehearse_gpu_proof.sh"]
)
def test_the_device_scripts_read_the_lock_and_pin_nothing_themselves(script: str) -> None:
    body = text(script)
    assert "scripts/gpu_lock.py" in body
    code = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))
    pinned = re.findall(r"([A-Za-z][\w.-]*)==\d", code)
    assert pinned == [], f"{script} pins {pinned}: constraints/gpu.txt is the one place"


def test_the_proof_checks_its_environment_before_measuring() -> None:
    body = text("scripts/gpu_proof.sh")
    assert body.index("gpu_lock.py check") < body.index("scripts/gpu_proof.py")


def test_the_check_stops_on_stale_or_missing_carried_wheels_and_an_old_peft() -> None:
    installed = {pin.name: pin.version for pin in LOCK.pins.values()}
    assert gpu_lock.check(LOCK, installed.get).errors == []

    device_torch = {**installed, "torch": "2.11.0+cu130", "numpy": "2.4.1"}
    verdict = gpu_lock.check(LOCK, device_torch.get)
    assert verdict.errors == [] and verdict.notes == [
        f"numpy 2.4.1 on this machine, the lock says {LOCK.version('numpy')}"
    ]

    stale = {**installed, "fastapi": "0.160.0"}
    (error,) = gpu_lock.check(LOCK, stale.get).errors
    assert (
        error.startswith("fastapi 0.160.0 is installed but the lock carries")
        and "make_device_wheels" in error
    )

    missing = {name: version for name, version in installed.items() if name != "opentelemetry-api"}
    (error,) = gpu_lock.check(LOCK, missing.get).errors
    assert error.startswith("opentelemetry-api is not installed")

    old_peft = {**installed, "peft": "0.15.2"}
    errors = gpu_lock.check(LOCK, old_peft.get).errors
    assert any("LoRA hot-swap needs peft >= 0.17, and peft 0.15.2 is installed" in e for e in errors)


def test_a_lock_line_the_parser_cannot_read_is_an_error(tmp_path: Path) -> None:
    lock = tmp_path / "gpu.txt"
    lock.write_text("# python 3.12\n# cuda 13.0\ntorch>=2.11  # device\n")
    with pytest.raises(ValueError, match=re.escape("expected 'name==version  # device|carried'")):
        gpu_lock.read_lock(lock)
    lock.write_text("torch==2.11.0  # device\n")
    with pytest.raises(ValueError, match=re.escape("no '# cuda / # python X.Y' header")):
        gpu_lock.read_lock(lock)


def test_the_command_line_lists_what_to_carry(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_lock.main(["carried"]) == 0
    carried = capsys.readouterr().out.split()
    assert f"torchao=={LOCK.version('torchao')}" in carried and not any(
        c.startswith("torch==") for c in carried
    )
    assert gpu_lock.main(["get", "torch"]) == 0 and capsys.readouterr().out.strip() == LOCK.version("torch")
