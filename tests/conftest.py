"""Shared fixtures: the tiny model, a local CA, and real `flux-server serve` processes.

- `tiny_model_dir` (session): the tiny random FLUX model, built once per checkout under pytest's
  temporary root (kept between sessions, never inside the repository).
- `certs` (session): a CA and a server certificate for loopback (server.tls.make_certificates).
- `flux_server` (session): one `flux-server serve --model tiny --workers 1` over HTTPS on a
  free loopback port, shared by the end-to-end tests; no API key (auth off).
- `launch_flux_server` (session): `launch_server(data_dir, tiny_model_dir=..., certs=...,
  args=..., api_keys=...)` for other session fixtures (the caller stops the server).
- `start_flux_server` (function): starts private servers with custom flags (auth on, short
  leases, retention...) and stops them when the test ends.
- `postgres_server`, `s3_server` (session): a real PostgreSQL (tests/pg_server.py) and a real
  S3 server, SeaweedFS (tests/s3_server.py), both on loopback with credentials enforced.

A server's data directory links the session's tiny model folder instead of rebuilding it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from server.tls import CertPaths, make_certificates
from tests.pg_server import postgres_server  # noqa: F401 - the session's PostgreSQL server
from tests.s3_server import s3_env, s3_server  # noqa: F401 - the session's S3 server (SeaweedFS)
from tests.support import free_port

REPO = Path(__file__).resolve().parents[1]
HEALTH_TIMEOUT = 120.0


def shared_test_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder under pytest's temporary root that outlives one session (pytest prunes only its
    numbered session folders), one per checkout so that branches never share a build."""
    digest = hashlib.sha1(str(REPO).encode()).hexdigest()[:12]
    return tmp_path_factory.getbasetemp().parent / f"flux-server-{digest}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.tiny import ensure_tiny

    return ensure_tiny(shared_test_data(tmp_path_factory))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certificates(tmp_path_factory.mktemp("certs"), hosts=[])


@dataclass
class FluxServer:
    """A running `flux-server serve` child process and how to reach it."""

    base_url: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    certs: CertPaths | None
    api_keys: list[str] = field(default_factory=list)

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.certs.ca)) if self.certs else True

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self.api_keys[0]}"} if self.api_keys else {}

    def client(self, **kwargs: object) -> httpx.Client:
        kwargs.setdefault("headers", self.auth_headers)
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.base_url, verify=self.verify, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def processes(self) -> dict:
        """The pids written by the supervisor: {"supervisor", "api", "workers": {id: pid}}."""
        return json.loads((self.data_dir / "run" / "processes.json").read_text())

    def worker_pid(self, worker_id: str = "w0") -> int:
        return int(self.processes()["workers"][worker_id])

    def health(self) -> httpx.Response:
        with self.client(timeout=5.0) as client:
            return client.get("/health")

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> dict:
        """Wait until /health says "ok" (every worker ready); its body."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"flux-server exited with status {self.process.returncode}\n--- log ---\n{self.log()}"
                )
            try:
                response = self.health()
                # "ok": every worker of the box is ready (200 "degraded" is ready with fewer).
                if response.status_code == 200 and response.json()["status"] == "ok":
                    return response.json()
                last = f"{response.status_code} {response.text}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.25)
        raise AssertionError(
            f"flux-server not healthy after {timeout:.0f} s: {last}\n--- log ---\n{self.log()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"flux-server did not stop within {timeout:.0f} s\n{self.log()}"
                ) from None
        return self.process.returncode


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process's environment without FLUX_* settings or AWS_* credentials that would
    leak into a server; `extra` adds a server's own (an S3 server's AWS_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "AWS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def launch_server(
    data_dir: Path,
    *,
    tiny_model_dir: Path,
    certs: CertPaths | None,
    args: Sequence[str] = (),
    api_keys: Sequence[str] = (),
    port: int | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> FluxServer:
    """Start `flux-server serve --model tiny` on `data_dir` (reusing a built tiny model)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / tiny_model_dir.name
    if not link.exists():
        link.symlink_to(tiny_model_dir, target_is_directory=True)
    port = port or free_port()
    argv = [sys.executable, "-m", "server.supervisor.cli", "serve", "--model", "tiny"]
    argv += ["--data-dir", str(data_dir), "--host", host, "--port", str(port), "--workers", str(workers)]
    if certs is not None:
        argv += ["--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
    for key in api_keys:
        argv += ["--api-key", key]
    argv += list(args)
    log_path = data_dir / f"serve-{port}-{int(time.time() * 1000)}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=server_env(env), cwd=REPO)
    scheme = "https" if certs is not None else "http"
    server = FluxServer(
        base_url=f"{scheme}://127.0.0.1:{port}",
        port=port,
        data_dir=data_dir,
        process=process,
        log_path=log_path,
        certs=certs,
        api_keys=list(api_keys),
    )
    if wait:
        try:
            server.wait_healthy()
        except BaseException:
            server.stop(signal.SIGKILL)
            raise
    return server


@pytest.fixture(scope="session")
def flux_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, certs: CertPaths
) -> Iterator[FluxServer]:
    server = launch_server(tmp_path_factory.mktemp("flux-data"), tiny_model_dir=tiny_model_dir, certs=certs)
    yield server
    with contextlib.suppress(AssertionError):
        server.stop()


StartServer = Callable[..., FluxServer]


@pytest.fixture(scope="session")
def launch_flux_server() -> Callable[..., FluxServer]:
    """`launch_server` itself, for session fixtures elsewhere that start their own server."""
    return launch_server


@pytest.fixture
def start_flux_server(tmp_path: Path, tiny_model_dir: Path, certs: CertPaths) -> Iterator[StartServer]:
    """`start_flux_server(args=[...], api_keys=[...], data_dir=..., tls=True, wait=True)`."""
    started: list[FluxServer] = []

    def start(*, data_dir: Path | None = None, tls: bool = True, **kwargs: object) -> FluxServer:
        server = launch_server(
            data_dir or tmp_path / f"data-{len(started)}",
            tiny_model_dir=tiny_model_dir,
            certs=certs if tls else None,
            **kwargs,  # type: ignore[arg-type]
        )
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(AssertionError):
            server.stop(timeout=20.0)
