"""Rendering the Kustomize overlays offline and reading the objects back, for the deploy tests.

`kubectl kustomize` is Debian's `kubectl` (scripts/setup.sh installs it); the manifests are
written for its kustomize 2.0 as well as for current ones.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir() if path.is_dir())

Obj = dict[str, Any]


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    """Every object of an overlay, as `kubectl kustomize` renders it."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: scripts/setup.sh installs Debian's (package kubernetes-client)"
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed: {done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


def of_kind(objects: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    (found,) = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    return found


def component(deployment: Obj) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def container(deployment: Obj, name: str | None = None) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    if name is None:
        (only,) = containers
        return only
    (found,) = [c for c in containers if c["name"] == name]
    return found


def env(container_spec: Obj) -> dict[str, Obj]:
    """A container's env entries by name."""
    return {entry["name"]: entry for entry in container_spec.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())
