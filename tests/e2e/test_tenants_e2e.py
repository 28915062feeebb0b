"""Tenants end to end: keys made by `flux-server keys add` in the data directory of a real
`flux-server serve` (tiny model), then the real clients of each protocol as two tenants and
an admin: fal_client, @fal-ai/client (both of its modes), the openai SDK and curl for BFL.
A request is invisible to the other tenant, its output URL opens without a key, quotas answer
429 with Retry-After, and a key revoked while its request runs is refused within seconds
while the request completes."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from e2e_support import APP, BLOCKER_INPUT, DEV, blocking_job, run_node_script, small_input

from tests.conftest import FluxServer
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)


def keys_command(data_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    return subprocess.run(
        [sys.executable, "-m", "server.supervisor.cli", "keys", "--data-dir", str(data_dir), *argv],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip


def add_key(data_dir: Path, name: str, *flags: str) -> str:
    return keys_command(data_dir, "add", name, *flags).stdout.strip()


@dataclass
class Tenants:
    server: FluxServer
    data_dir: Path
    keys: dict[str, str]
    fal: object  # the fal_client module

    def fal_client(self, who: str):
        return self.fal.SyncClient(key=self.keys[who])

    def http(self, who: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Key {self.keys[who]}"} if who else {}
        return httpx.Client(
            base_url=self.server.base_url, verify=self.server.verify, headers=headers, timeout=60
        )


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, tiny_model_dir, certs, launch_flux_server) -> Iterator[Tenants]:
    data_dir = tmp_path_factory.mktemp("tenants-e2e")
    keys = {
        "team-a": add_key(data_dir, "team-a"),
        "team-b": add_key(data_dir, "team-b"),
        "boss": add_key(data_dir, "boss", "--role", "admin"),
        "tight": add_key(data_dir, "tight", "--queued", "1"),
        "leaver": add_key(data_dir, "leaver"),
    }
    server = launch_flux_server(data_dir, tiny_model_dir=tiny_model_dir, certs=certs)
    hostport = f"127.0.0.1:{server.port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SSL_CERT_FILE", str(certs.bundle))
        patch.setenv("FAL_QUEUE_RUN_HOST", hostport)
        patch.setenv("FAL_RUN_HOST", f"{hostport}/run")
        import fal_client
        import fal_client.client

        patch.setattr(fal_client.client, "RUN_URL_FORMAT", f"https://{hostport}/run/")
        patch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"https://{hostport}/")
        patch.setattr(fal_client.client, "REST_URL", server.base_url)  # uploads come here too
        patch.setattr(fal_client.client, "CDN_URL", server.base_url)
        try:
            yield Tenants(server=server, data_dir=data_dir, keys=keys, fal=fal_client)
        finally:
            server.stop()


def test_keys_never_reach_the_process_list(tenants):
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    for token in tenants.keys.values():
        assert token not in listing


def test_fal_client_tenants_see_only_their_own_requests(tenants):
    a, b, boss = tenants.fal_client("team-a"), tenants.fal_client("team-b"), tenants.fal_client("boss")
    handle = a.submit(DEV, small_input(seed=21))
    output = handle.get()
    assert output["seed"] == 21
    HTTPError = tenants.fal.FalClientHTTPError
    for call in (
        lambda: b.status(DEV, handle.request_id),
        lambda: b.result(DEV, handle.request_id),
        lambda: b.cancel(DEV, handle.request_id),
    ):
        with pytest.raises(HTTPError) as caught:
            call()
        assert caught.value.status_code == 404
    assert isinstance(boss.status(DEV, handle.request_id), tenants.fal.Completed)
    assert boss.result(DEV, handle.request_id)["seed"] == 21
    # The output opens in a plain <img src>: no key, no header.
    url = output["images"][0]["url"]
    image = httpx.get(url, verify=tenants.server.verify)
    assert image.status_code == 200 and image.headers["content-type"].startswith("image/")
    name = url.rsplit("/", 1)[1]
    unsigned = httpx.get(f"{tenants.server.base_url}/files/{name}", verify=tenants.server.verify)
    assert unsigned.status_code == 403


def test_fal_client_uploads_belong_to_their_signed_url(tenants):
    a = tenants.fal_client("team-a")
    data = b"\x89PNG\r\n\x1a\n" + b"0" * 64
    urls = [
        a.upload(data, "image/png", "a.png"),  # one request
        a.upload(data, "image/png", "b.png", repository="fal"),  # initiate + PUT
    ]
    with pytest.MonkeyPatch.context() as patch:
        # Multipart (above 100 MB in real use; lowered here): fal_client sends the parts under
        # the signed URL it was given, and returns that URL as the file's.
        patch.setattr(tenants.fal.client, "MULTIPART_THRESHOLD", 64)
        patch.setattr(tenants.fal.client, "MULTIPART_CHUNK_SIZE", 40)
        urls.append(a.upload(data, "image/png", "c.png"))
    for url in urls:
        assert url.startswith(f"{tenants.server.base_url}/files/"), url
        got = httpx.get(url, verify=tenants.server.verify)  # no key: the URL is the permission
        assert got.status_code == 200 and got.content == data, url
        name = url.rsplit("/", 1)[1]
        unsigned = httpx.get(f"{tenants.server.base_url}/files/{name}", verify=tenants.server.verify)
        assert unsigned.status_code == 403


@pytest.mark.parametrize("mode", ["middleware", "proxy"])
def test_fal_js_client_tenants_see_only_their_own_requests(tenants, mode):
    seen = run_node_script(
        tenants.server,
        "tenants.mjs",
        FAL_MODE=mode,
        KEY_A=tenants.keys["team-a"],
        KEY_B=tenants.keys["team-b"],
    )
    assert seen["ownResult"]["ok"] and seen["ownResult"]["value"]["data"]["seed"] == 3
    unknown = seen["otherStatus"]
    assert not unknown["ok"] and unknown["status"] == 404
    for name in ("foreignStatus", "foreignResult", "foreignCancel"):
        assert not seen[name]["ok"] and seen[name]["status"] == 404, (name, seen[name])
    assert seen["foreignStatus"]["body"] == unknown["body"]
    assert seen["ownRun"]["ok"] and seen["ownRun"]["value"]["data"]["seed"] == 4


def test_bfl_with_curl_isolation_and_signed_sample(tenants):
    base, ca = tenants.server.base_url, str(tenants.server.certs.ca)

    def curl(*argv: str) -> dict:
        done = subprocess.run(
            ["curl", "-sS", "--cacert", ca, *argv], capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout)

    submitted = curl(
        "-X", "POST", f"{base}/v1/flux-dev", "-H", f"x-key: {tenants.keys['team-a']}",
        "-H", "content-type: application/json",
        "-d", json.dumps({"prompt": "a fox", "width": 256, "height": 256, "steps": 2}),
    )  # fmt: skip
    task = submitted["id"]
    poll = ("-G", f"{base}/v1/get_result", "--data-urlencode", f"id={task}")
    foreign = curl(*poll, "-H", f"x-key: {tenants.keys['team-b']}")
    assert foreign["status"] == "Task not found"
    ready = wait_until(
        lambda: (r := curl(*poll, "-H", f"x-key: {tenants.keys['team-a']}"))["status"] == "Ready" and r,
        60,
        "the BFL task",
    )
    sample = ready["result"]["sample"]
    assert (
        subprocess.run(["curl", "-sSf", "--cacert", ca, "-o", "/dev/null", sample], check=False).returncode
        == 0
    )
    assert curl(*poll, "-H", f"x-key: {tenants.keys['team-b']}")["status"] == "Task not found"


def test_openai_sdk_quota_is_a_rate_limit_error_with_retry_after(tenants):
    # The tenant's one slot is taken by a long fal request; the SDK's next call is refused.
    with tenants.http("tight") as http:
        blocker = http.post(f"/{DEV}", json=BLOCKER_INPUT)
        assert blocker.status_code == 200, blocker.text
        request_id = blocker.json()["request_id"]
        http_client = httpx.Client(verify=tenants.server.verify, timeout=60)
        client = openai.OpenAI(
            base_url=f"{tenants.server.base_url}/v1",
            api_key=tenants.keys["tight"],
            http_client=http_client,
            max_retries=0,
        )
        with client, pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(prompt="p", size="64x64", extra_body={"steps": 2})
        assert caught.value.response.headers["retry-after"]
        assert caught.value.body["code"] == "rate_limit_exceeded"
        assert http.put(f"/{APP}/requests/{request_id}/cancel").status_code == 202
    # Another tenant's generation meanwhile works, and its URL opens without a key.
    with openai.OpenAI(
        base_url=f"{tenants.server.base_url}/v1",
        api_key=tenants.keys["team-b"],
        http_client=httpx.Client(verify=tenants.server.verify, timeout=120),
        max_retries=0,
    ) as client:
        image = client.images.generate(prompt="p", size="64x64", extra_body={"steps": 2}).data[0]
    assert httpx.get(image.url, verify=tenants.server.verify).status_code == 200


def test_a_key_revoked_while_its_request_runs(tenants):
    leaver = tenants.fal_client("leaver")
    handle = leaver.submit(DEV, {**BLOCKER_INPUT, "num_inference_steps": 6})
    with tenants.http("leaver") as http:
        wait_until(
            lambda: http.get(f"/{APP}/requests/{handle.request_id}/status").json()["status"] == "IN_PROGRESS",
            60,
            "the request to start",
        )
        keys_command(tenants.data_dir, "revoke", "leaver")
        revoked_at = time.monotonic()
        wait_until(
            lambda: http.get(f"/{APP}/requests/{handle.request_id}/status").status_code == 401,
            10,
            "the refusal",
        )
        assert time.monotonic() - revoked_at < 5
    boss = tenants.fal_client("boss")
    output = boss.result(DEV, handle.request_id)  # it ran to the end
    assert output["images"] and output["seed"] == BLOCKER_INPUT["seed"]


def test_an_output_url_expires_when_the_submits_lifecycle_asks(tenants):
    """fal's lifecycle preference on a submit (fal_client's `headers=`) sets the expiry signed
    into the output URL; without one, the URL lives as long as the result (the retention)."""
    a = tenants.fal_client("team-a")
    preference = {"X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": 600}'}
    started = time.time()
    short = a.subscribe(DEV, small_input(seed=31), headers=preference)["images"][0]["url"]
    default = a.subscribe(DEV, small_input(seed=32))["images"][0]["url"]
    expiry = int(short.rsplit("/", 2)[1].split(".")[0])
    assert started + 600 <= expiry <= time.time() + 601
    assert int(default.rsplit("/", 2)[1].split(".")[0]) >= started + 24 * 3600 - 1  # the retention
    assert httpx.get(short, verify=tenants.server.verify).status_code == 200


def test_an_idempotency_key_is_the_tenants_own(tenants):
    """The same Idempotency-Key from two tenants makes two requests; from one tenant, one."""
    a, b = tenants.fal_client("team-a"), tenants.fal_client("team-b")
    headers = {"Idempotency-Key": "nightly-batch-7"}
    first = a.submit(DEV, small_input(seed=41), headers=headers).request_id
    again = a.submit(DEV, small_input(seed=41), headers=headers).request_id
    other = b.submit(DEV, small_input(seed=41), headers=headers).request_id
    assert first == again and other != first
    with pytest.raises(tenants.fal.FalClientHTTPError) as caught:
        b.status(DEV, first)  # still another tenant's request
    assert caught.value.status_code == 404
    assert a.result(DEV, first)["seed"] == 41 and b.result(DEV, other)["seed"] == 41


def test_fal_client_a_tenants_backlog_delays_anothers_request_by_at_most_one_job(tenants):
    """Fair share with the real client and the real worker: 200 requests of team-a wait
    behind a running one; team-b's single request, submitted after them all, is second in
    line and the next but one to start."""
    a, b = tenants.fal_client("team-a"), tenants.fal_client("team-b")
    with tenants.http("team-a") as http:
        with blocking_job(http):
            backlog = [a.submit(DEV, small_input(seed=n)).request_id for n in range(200)]
            single = b.submit(DEV, small_input()).request_id
            waiting = b.status(DEV, single)
            assert isinstance(waiting, tenants.fal.Queued) and waiting.position == 1
        assert b.result(DEV, single)["images"]  # the blocker is cancelled: the worker goes on
        ours = {*backlog, single}
        with sqlite3.connect(tenants.data_dir / "queue.sqlite3") as db:
            rows = db.execute("SELECT id FROM jobs WHERE started_at IS NOT NULL ORDER BY started_at")
            started = [request_id for (request_id,) in rows if request_id in ours]
        assert single in started[:2], started[:3]
        for request_id in backlog:  # the rest of the backlog would hold the module's worker
            http.put(f"/{APP}/requests/{request_id}/cancel")


def queued_refusals(admin: httpx.Client, tenant: str) -> float:
    """fluxserver_quota_refusals_total for the tenant's queued quota, as /metrics sums it."""
    metrics = admin.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    pattern = rf'^fluxserver_quota_refusals_total{{quota="queued",tenant="{tenant}"}} (\S+)$'
    found = re.search(pattern, metrics.text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_fal_client_waits_out_a_queued_quota_by_itself(tenants):
    """fal_client retries a 429 with backoff on its own: a submit over the queued quota goes
    through as soon as the tenant's slot frees, and each refusal shows in /metrics."""
    tight = tenants.fal_client("tight")
    with tenants.http("tight") as http, tenants.http("boss") as boss:
        blocker = http.post(f"/{DEV}", json=BLOCKER_INPUT).json()["request_id"]
        refused_before = queued_refusals(boss, "tight")
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(tight.submit, DEV, small_input())
            wait_until(lambda: queued_refusals(boss, "tight") > refused_before, 30, "a refusal")
            assert not waiting.done()  # refused, and retrying
            assert http.put(f"/{APP}/requests/{blocker}/cancel").status_code == 202
            handle = waiting.result(timeout=120)
    assert tight.result(DEV, handle.request_id)["images"]
