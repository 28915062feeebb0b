"""Which GPU each worker gets (server/supervisor/gpus.py): CUDA_VISIBLE_DEVICES entries as given
(indices, UUIDs, MIG ids), else 0..n-1; and what the supervisor hands each worker process
(`--gpu <entry>` and `CUDA_VISIBLE_DEVICES=<entry>`). No GPU needed: the plan and the child
command lines are observable."""

from __future__ import annotations

import os
import sys

import pytest

from server.config import Settings
from server.supervisor.gpus import WorkerSlot, plan_workers, visible_gpus
from server.supervisor.loop import Supervisor
from server.supervisor.preflight import ConfigError

UUIDS = "GPU-8f6c2b1e-0000-1111-2222-333344445555,GPU-1a2b3c4d-6666-7777-8888-999900001111"
MIG = "MIG-4b1d7e3a-aaaa-bbbb-cccc-ddddeeeeffff"


def settings(**kwargs: object) -> Settings:
    return Settings(_env_file=None, **kwargs)  # type: ignore[call-arg]


@pytest.fixture(autouse=True)
def no_flux_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLUX_"):
            monkeypatch.delenv(name)


def test_worker_plan_without_cuda_visible_devices() -> None:
    assert plan_workers(settings(device="cpu"), gpus=["0", "1"]) == plan_workers(settings(), gpus=[])
    cpu = plan_workers(settings(), gpus=[])
    assert [(s.worker_id, s.gpu, s.device) for s in cpu] == [("w0", None, "cpu")]
    two = plan_workers(settings(), gpus=["0", "1"])
    assert [(s.worker_id, s.gpu, s.device) for s in two] == [("w0", "0", "cuda:0"), ("w1", "1", "cuda:1")]
    three_on_two = plan_workers(settings(workers=3), gpus=["0", "1"])
    assert [s.gpu for s in three_on_two] == ["0", "1", "0"]
    assert [s.device for s in plan_workers(settings(workers=2, device="cpu"), gpus=["0", "1"])] == [
        "cpu",
        "cpu",
    ]
    assert plan_workers(settings(role="api"), gpus=["0"]) == []
    with pytest.raises(ConfigError, match="no GPU"):
        plan_workers(settings(device="cuda"), gpus=[])


@pytest.mark.parametrize(
    ("visible", "entries"),
    [
        ("0,1", ["0", "1"]),
        ("2,3", ["2", "3"]),
        (" 3 ", ["3"]),
        ("", []),
        ("-1", []),
        ("0,-1,1", ["0"]),  # CUDA stops at the first invalid entry
        (UUIDS, UUIDS.split(",")),
        (MIG, [MIG]),
    ],
)
def test_visible_gpus_are_cuda_visible_devices_as_given(
    monkeypatch: pytest.MonkeyPatch, visible: str, entries: list[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == entries


def test_a_shared_box_plans_its_workers_on_the_gpus_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    slots = plan_workers(settings())  # what `serve` does: the variable decides
    assert [(s.worker_id, s.gpu, s.device) for s in slots] == [("w0", "2", "cuda:2"), ("w1", "3", "cuda:3")]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", UUIDS)
    first, second = UUIDS.split(",")
    assert [(s.gpu, s.device) for s in plan_workers(settings())] == [(first, first), (second, second)]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG)
    assert [s.gpu for s in plan_workers(settings(workers=2))] == [MIG, MIG]


def test_each_worker_process_gets_its_entry_as_flag_and_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"3,{MIG}")
    supervisor = Supervisor(settings(data_dir=tmp_path), plan_workers(settings()))
    api, w0, w1 = supervisor.children
    assert api.argv == [sys.executable, "-m", "server.supervisor.cli", "api"]
    assert w0.argv[-4:] == ["--worker-id", "w0", "--gpu", "3"]
    assert w1.argv[-4:] == ["--worker-id", "w1", "--gpu", MIG]
    assert w0.env == {"CUDA_VISIBLE_DEVICES": "3"} and w1.env == {"CUDA_VISIBLE_DEVICES": MIG}
    assert api.env == {}  # the API imports no CUDA; it keeps the box's variable

    cpu = Supervisor(settings(data_dir=tmp_path), [WorkerSlot("w0", None)])
    assert "--gpu" not in cpu.children[1].argv and cpu.children[1].env == {}


def test_the_worker_command_takes_a_gpu_entry_as_given() -> None:
    from server.supervisor.cli import build_parser

    args = build_parser().parse_args(["worker", "--worker-id", "w1", "--gpu", MIG])
    assert args.gpu == MIG
    assert build_parser().parse_args(["worker", "--gpu", "2"]).gpu == "2"
