"""The seed documents' flow with the real `curl` binary: submit, poll status, fetch the result.

`/fal-ai/flux/dev` with `Authorization: Key ...` and the aggregator variant `/fal-ai/flux-1/dev`
with `Authorization: Bearer ...`, against a server started with `--api-key` (auth on); and the
same flow without any key against the shared server (auth off).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from e2e_support import AUTH_KEY, check_output

pytestmark = pytest.mark.timeout(180)

BODY = {
    "prompt": "a tiny red house",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 2,
    "seed": 42,
}


def curl(
    server,
    method: str,
    path: str,
    *,
    auth: str | None = None,
    body: dict | None = None,
) -> tuple[int, dict]:
    """One request with curl; returns the HTTP status and the JSON body."""
    binary = shutil.which("curl")
    assert binary is not None, "curl is not installed"
    argv = [binary, "-sS", "--cacert", str(server.certs.ca), "-X", method, "-w", "\n%{http_code}"]
    if auth is not None:
        argv += ["-H", f"Authorization: {auth}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    proc = subprocess.run([*argv, server.base_url + path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text, _, code = proc.stdout.rpartition("\n")
    return int(code), json.loads(text) if text else {}


def seed_flow(server, submit_path: str, app: str, auth: str | None) -> dict:
    code, submitted = curl(server, "POST", submit_path, auth=auth, body=BODY)
    assert code == 200, submitted
    request_id = submitted["request_id"]
    assert submitted["status_url"] == f"{server.base_url}/{app}/requests/{request_id}/status"
    deadline = time.monotonic() + 60
    while True:
        code, state = curl(server, "GET", f"/{app}/requests/{request_id}/status", auth=auth)
        assert code in (200, 202), state
        if state["status"] == "COMPLETED":
            assert code == 200
            break
        assert code == 202
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    code, result = curl(server, "GET", f"/{app}/requests/{request_id}", auth=auth)
    assert code == 200, result
    assert result["seed"] == 42 and result["prompt"] == BODY["prompt"]
    with server.client() as client:
        check_output(client, result)
    return result


def test_fal_flux_dev_with_key_header(auth_server) -> None:
    seed_flow(auth_server, "/fal-ai/flux/dev", "fal-ai/flux", f"Key {AUTH_KEY}")


def test_aggregator_variant_flux_1_dev_with_bearer(auth_server) -> None:
    seed_flow(auth_server, "/fal-ai/flux-1/dev", "fal-ai/flux-1", f"Bearer {AUTH_KEY}")


def test_auth_on_refuses_missing_and_wrong_keys(auth_server) -> None:
    for auth in (None, "Key wrong-key", "Bearer wrong-key", f"Basic {AUTH_KEY}"):
        code, body = curl(auth_server, "POST", "/fal-ai/flux/dev", auth=auth, body=BODY)
        assert code == 401, (auth, body)
        assert isinstance(body["detail"], str)
    code, _ = curl(auth_server, "GET", "/fal-ai/flux/requests/00000000-0000-0000-0000-000000000000/status")
    assert code == 401
    code, _ = curl(auth_server, "POST", "/run/fal-ai/flux/dev", auth="Key nope", body=BODY)
    assert code == 401


def test_auth_off_server_needs_no_key(flux_server) -> None:
    seed_flow(flux_server, "/fal-ai/flux/dev", "fal-ai/flux", None)
