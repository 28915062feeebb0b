"""Tenants over real HTTP (a real API server and queue; the test plays the worker): named keys
from the data directory's keys file, ownership on every protocol's read routes, admin and
metrics roles, quotas (429 + Retry-After in each protocol's shape), revocation without a
restart, signed file URLs, and the legacy keys that keep working."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY

from server.api import queued_counts
from server.jobs import Status
from server.tenants import Quotas, Role
from server.tenants.keys import KeyEntry, KeysFile, hash_token, load, new_token, save
from tests.server.conftest import ApiServer, api_settings, run_api_server
from tests.support import wait_until

TOKENS = {
    name: new_token() for name in ("team-a", "team-b", "boss", "scraper", "tight", "roomy", "slow", "daily")
}
LEGACY = "legacy-admin-key"
FAL_BODY = {"prompt": "a fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}


def key_entries() -> KeysFile:
    roles = {"boss": Role.ADMIN, "scraper": Role.METRICS}
    quotas = {
        "tight": Quotas(queued=2),
        "roomy": Quotas(queued=100),
        "slow": Quotas(per_minute=2),
        "daily": Quotas(images_per_day=3),
    }
    keys = KeysFile()
    for name, token in TOKENS.items():
        keys = keys.with_entry(
            KeyEntry(
                name=name,
                role=roles.get(name, Role.USER),
                sha256=hash_token(token),
                quotas=quotas.get(name, Quotas()),
                weight=2.0 if name == "team-a" else 1.0,
            )
        )
    return keys


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    data_dir = tmp_path_factory.mktemp("tenants")
    save(data_dir / "keys.json", key_entries())  # the default keys file: no flag needed
    with run_api_server(api_settings(data_dir, api_key=[LEGACY])) as api:
        yield api


@pytest.fixture
def api(server: ApiServer) -> Iterator[ApiServer]:
    server.drain()
    yield server
    server.drain()


def as_(name: str) -> dict[str, str]:
    return {"authorization": f"Key {LEGACY if name == 'legacy' else TOKENS[name]}"}


def fal_submit(api: ApiServer, who: str, body: dict | None = None) -> str:
    response = api.client.post("/fal-ai/flux/dev", json=body or FAL_BODY, headers=as_(who))
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def fal_reads(api: ApiServer, request_id: str, who: str) -> list[httpx.Response]:
    base = f"/fal-ai/flux/requests/{request_id}"
    return [
        api.client.get(f"{base}/status", headers=as_(who)),
        api.client.get(base, headers=as_(who)),
        api.client.get(f"{base}/status/stream", headers=as_(who)),
    ]


def test_a_submit_belongs_to_its_keys_tenant_and_the_weights_follow_the_keys(api):
    request_id = fal_submit(api, "team-a")
    assert api.worker.get(request_id).job.tenant == "team-a"
    assert api.app.state.queue.tenant_weights["team-a"] == 2.0
    legacy_id = fal_submit(api, "legacy")
    assert api.worker.get(legacy_id).job.tenant is None  # --api-key: the unnamed admin


def test_another_tenant_gets_exactly_the_answer_of_an_unknown_id_on_fal(api):
    request_id = fal_submit(api, "team-a")
    unknown = fal_reads(api, "00000000-0000-0000-0000-000000000000", "team-b")
    foreign = fal_reads(api, request_id, "team-b")
    for theirs, nobodys in zip(foreign, unknown, strict=True):
        assert theirs.status_code == nobodys.status_code == 404
        assert theirs.json() == nobodys.json()
    cancel = api.client.put(f"/fal-ai/flux/requests/{request_id}/cancel", headers=as_("team-b"))
    assert cancel.status_code == 404 and cancel.json() == {"status": "NOT_FOUND"}
    assert api.worker.get(request_id).status is Status.IN_QUEUE  # B's cancel did nothing
    # Its owner, the admin of the keys file and the legacy admin all see it.
    for who in ("team-a", "boss", "legacy"):
        answer = api.client.get(f"/fal-ai/flux/requests/{request_id}/status", headers=as_(who))
        assert answer.status_code == 202, (who, answer.text)
    assert (
        api.client.put(f"/fal-ai/flux/requests/{request_id}/cancel", headers=as_("boss")).status_code == 202
    )


def test_the_owner_reads_its_result_and_stream_and_the_output_url_is_signed(api):
    request_id = fal_submit(api, "team-a")
    api.complete(api.claim(request_id))
    status, result, stream = fal_reads(api, request_id, "team-a")
    assert (status.status_code, result.status_code, stream.status_code) == (200, 200, 200)
    assert '"COMPLETED"' in stream.text
    url = result.json()["images"][0]["url"]
    signature, name = url.removeprefix(f"{api.base_url}/files/").split("/")
    assert name.endswith(".png") and signature.count(".") == 1
    # A plain <img src>: no key, no header.
    image = httpx.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert httpx.head(url).status_code == 200
    expires, sig = signature.split(".")
    altered = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    refused = {
        "unsigned": f"{api.base_url}/files/{name}",
        "altered signature": f"{api.base_url}/files/{expires}.{altered}/{name}",
        "longer life": f"{api.base_url}/files/{int(expires) + 3600}.{sig}/{name}",
        "another file": f"{api.base_url}/files/{signature}/{'x' * 32}.png",
        "garbage": f"{api.base_url}/files/not-a-signature/{name}",
    }
    for what, bad in refused.items():
        answer = httpx.get(bad)
        assert answer.status_code == 403, what
        assert "signature" in answer.json()["detail"] or "signed" in answer.json()["detail"]
    expired = api.app.state.url_signer.segment(name, expires_at=time.time() - 1)
    answer = httpx.get(f"{api.base_url}/files/{expired}/{name}")
    assert answer.status_code == 403 and answer.json()["detail"] == "This file URL has expired"


def test_bfl_get_result_of_another_tenant_is_task_not_found(api):
    submitted = api.client.post("/v1/flux-dev", json={"prompt": "a fox"}, headers={"x-key": TOKENS["team-a"]})
    assert submitted.status_code == 200, submitted.text
    task = submitted.json()["id"]
    assert api.worker.get(task).job.tenant == "team-a"
    foreign = api.client.get("/v1/get_result", params={"id": task}, headers={"x-key": TOKENS["team-b"]})
    unknown = api.client.get("/v1/get_result", params={"id": "nope"}, headers={"x-key": TOKENS["team-b"]})
    assert foreign.status_code == unknown.status_code == 200
    assert foreign.json() == {**unknown.json(), "id": task} and foreign.json()["status"] == "Task not found"
    api.complete(api.claim(task))
    own = api.client.get("/v1/get_result", params={"id": task}, headers={"x-key": TOKENS["team-a"]})
    assert own.json()["status"] == "Ready"
    sample = own.json()["result"]["sample"]
    assert "/files/" in sample and httpx.get(sample).status_code == 200  # signed, no key
    admin = api.client.get("/v1/get_result", params={"id": task}, headers={"x-key": TOKENS["boss"]})
    assert admin.json()["status"] == "Ready"


def test_a_metrics_key_reads_metrics_only_and_a_user_key_cannot_read_metrics(api):
    assert api.client.get("/metrics", headers=as_("scraper")).status_code == 200
    assert api.client.get("/metrics", headers=as_("team-a")).status_code == 401
    assert api.client.get("/metrics", headers=as_("boss")).status_code == 200
    submit = api.client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=as_("scraper"))
    assert submit.status_code == 401 and submit.json() == {"detail": "Invalid API key"}
    bfl = api.client.post("/v1/flux-dev", json={"prompt": "p"}, headers={"x-key": TOKENS["scraper"]})
    assert bfl.status_code == 403


def test_the_queued_quota_is_429_with_retry_after_on_every_protocol(api):
    counted = refusals("tight", "queued")
    first, second = fal_submit(api, "tight"), fal_submit(api, "tight")
    fal = api.client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=as_("tight"))
    assert fal.status_code == 429 and int(fal.headers["retry-after"]) > 0
    assert "at most 2 queued or running" in fal.json()["detail"]
    bfl = api.client.post("/v1/flux-dev", json={"prompt": "p"}, headers={"x-key": TOKENS["tight"]})
    assert bfl.status_code == 429 and bfl.headers["retry-after"] and isinstance(bfl.json()["detail"], str)
    openai = api.client.post(
        "/v1/images/generations",
        json={"prompt": "p", "size": "256x256", "response_format": "url"},
        headers={"authorization": f"Bearer {TOKENS['tight']}"},
    )
    assert openai.status_code == 429 and openai.headers["retry-after"]
    assert openai.json()["error"]["code"] == "rate_limit_exceeded"
    assert refusals("tight", "queued") == counted + 3  # one per protocol
    # Other tenants are not held back, and a finished job frees a slot: running counts too.
    fal_submit(api, "team-b")
    api.complete(api.claim(first))
    assert api.worker.get(second).status is Status.IN_QUEUE
    fal_submit(api, "tight")


def refusals(tenant: str, quota: str) -> float:
    """fluxserver_quota_refusals_total of this process (the app runs in the test's process)."""
    value = REGISTRY.get_sample_value("fluxserver_quota_refusals_total", {"tenant": tenant, "quota": quota})
    return value or 0.0


def test_submits_per_minute_and_images_per_day_are_429_with_retry_after(api):
    counted = {
        quota: refusals(tenant, quota)
        for tenant, quota in (("slow", "per_minute"), ("daily", "images_per_day"))
    }
    fal_submit(api, "slow")
    fal_submit(api, "slow")
    third = api.client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=as_("slow"))
    assert third.status_code == 429 and 0 < int(third.headers["retry-after"]) <= 60
    assert "2 submits per minute" in third.json()["detail"]

    fal_submit(api, "daily", {**FAL_BODY, "num_images": 2})
    over = api.client.post("/fal-ai/flux/dev", json={**FAL_BODY, "num_images": 2}, headers=as_("daily"))
    assert over.status_code == 429 and "3 images per UTC day" in over.json()["detail"]
    assert 0 < int(over.headers["retry-after"]) <= 86400
    fal_submit(api, "daily", {**FAL_BODY, "num_images": 1})  # exactly up to the limit
    assert refusals("slow", "per_minute") == counted["per_minute"] + 1
    assert refusals("daily", "images_per_day") == counted["images_per_day"] + 1


def test_a_revoked_key_is_refused_within_seconds_and_its_requests_live_on(api):
    token = new_token()
    path = api.settings.data_dir / "keys.json"
    save(path, load(path).with_entry(KeyEntry(name="leaver", role=Role.USER, sha256=hash_token(token))))
    headers = {"authorization": f"Key {token}"}
    wait_until(
        lambda: api.client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=headers).status_code == 200,
        5,
        "the added key",
    )
    running = api.claim()  # the in-flight request
    assert running.job.tenant == "leaver"
    request_id = running.id
    save(path, load(path).revoked("leaver"))
    started = time.monotonic()
    wait_until(
        lambda: (
            api.client.get(f"/fal-ai/flux/requests/{request_id}/status", headers=headers).status_code == 401
        ),
        5,
        "the revocation",
    )
    assert time.monotonic() - started < 3
    record = api.worker.get(request_id)
    api.complete(record)  # the running request still completes
    admin = api.client.get(f"/fal-ai/flux/requests/{request_id}", headers=as_("boss"))
    assert admin.status_code == 200 and admin.json()["images"]


def test_keys_never_appear_in_error_bodies(api):
    wrong = api.client.get(
        "/fal-ai/flux/requests/x/status", headers={"authorization": "Key flux_secret-value"}
    )
    assert wrong.status_code == 401 and "flux_secret-value" not in wrong.text


def test_run_and_stream_submits_belong_to_their_tenant_and_count_against_its_quota(api):
    # /run waits for the job; the test plays the worker meanwhile.
    with httpx.Client(base_url=api.base_url, timeout=20) as client:
        answers: list[httpx.Response] = []
        waiting = threading.Thread(
            target=lambda: answers.append(
                client.post("/run/fal-ai/flux/dev", json=FAL_BODY, headers=as_("team-b"))
            )
        )
        waiting.start()
        record = api.claim(timeout=10)
        assert record.job.tenant == "team-b"
        api.complete(record)
        waiting.join(20)
    assert (
        answers[0].status_code == 200 and httpx.get(answers[0].json()["images"][0]["url"]).status_code == 200
    )
    # The queued quota counts /run and /stream submits too.
    fal_submit(api, "tight")
    fal_submit(api, "tight")
    for path in ("/run/fal-ai/flux/dev", "/run/fal-ai/flux/dev/stream"):
        refused = api.client.post(path, json=FAL_BODY, headers=as_("tight"))
        assert refused.status_code == 429 and refused.headers["retry-after"], path


def test_a_webhook_carries_signed_urls(api):
    from tests.server.api.webhooks.test_webhook_dispatch import Receiver

    receiver = Receiver([])
    try:
        submitted = api.client.post(
            "/fal-ai/flux/dev",
            params={"fal_webhook": f"{receiver.url}/hook"},
            json=FAL_BODY,
            headers=as_("team-a"),
        )
        assert submitted.status_code == 200, submitted.text
        api.complete(api.claim(submitted.json()["request_id"]))
        wait_until(lambda: receiver.calls, 20, "the webhook")
        body = json.loads(receiver.calls[0][2])
        url = body["payload"]["images"][0]["url"]
        assert url.count("/") == 5 and httpx.get(url).status_code == 200  # /files/<exp>.<sig>/<name>
    finally:
        receiver.close()


@pytest.mark.anyio
async def test_a_burst_admits_exactly_up_to_the_queued_quota(api):
    async with httpx.AsyncClient(base_url=api.base_url, timeout=20) as client:
        answers = await asyncio.gather(
            *(client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=as_("tight")) for _ in range(12))
        )
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200, 200] + [429] * 10
    assert api.worker.active_count("tight") == 2


@pytest.mark.anyio
async def test_a_burst_reads_the_count_once_and_a_freed_slot_is_seen_at_once(api, monkeypatch):
    """The queued count read for one admission serves the next ones (one query per burst, not
    one per submit), yet a refusal always rests on a count read after the submit arrived."""
    monkeypatch.setattr(queued_counts, "REUSE_SECONDS", 60.0)  # any count may be reused
    api.app.state.queued_counts.forget()
    counts = api.app.state.queued_counts
    real_count, reads = counts.read, []

    async def counting(tenant):  # type: ignore[no-untyped-def]
        reads.append(tenant)
        return await real_count(tenant)

    monkeypatch.setattr(counts, "read", counting)

    def submit(client: httpx.AsyncClient, who: str):  # type: ignore[no-untyped-def]
        return client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=as_(who))

    async with httpx.AsyncClient(base_url=api.base_url, timeout=20) as client:
        roomy = await asyncio.gather(*(submit(client, "roomy") for _ in range(12)))
        assert [answer.status_code for answer in roomy] == [200] * 12
        assert reads == ["roomy"]  # one query for the twelve admissions
        api.drain()
        first = (await submit(client, "tight")).json()["request_id"]
        assert (await submit(client, "tight")).status_code == 200
        assert (await submit(client, "tight")).status_code == 429  # full, read afresh to say so
        api.complete(api.claim(first))  # a slot frees; the count this process holds says full
        again = await submit(client, "tight")
    assert again.status_code == 200 and api.worker.active_count("tight") == 2


@pytest.mark.anyio
async def test_a_burst_after_slots_freed_admits_exactly_up_to_the_limit(api, monkeypatch):
    """A count that says full, held while the tenant's jobs finish, makes every submit of the
    next burst read afresh (a refusal rests on a read after its arrival); those reads overlap,
    and the admissions must add to the one count the next submits see."""
    monkeypatch.setattr(queued_counts, "REUSE_SECONDS", 0.0)  # every count is stale...
    monkeypatch.setattr(queued_counts, "USABLE_SECONDS", 60.0)  # ...yet still usable
    fal_submit(api, "tight")
    fal_submit(api, "tight")
    assert api.client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=as_("tight")).status_code == 429
    api.drain()  # both slots free; this process still holds "2 of 2"
    async with httpx.AsyncClient(base_url=api.base_url, timeout=20) as client:
        answers = await asyncio.gather(
            *(client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=as_("tight")) for _ in range(12))
        )
    assert sorted(answer.status_code for answer in answers) == [200, 200] + [429] * 10
    assert api.worker.active_count("tight") == 2


@pytest.mark.anyio
async def test_a_usable_count_admits_without_waiting_for_its_refresh(api, monkeypatch):
    """A count older than the reuse interval still admits at once while a new read runs in
    the background: a slow count query holds no submit back."""
    monkeypatch.setattr(queued_counts, "REUSE_SECONDS", 0.0)
    monkeypatch.setattr(queued_counts, "USABLE_SECONDS", 60.0)
    fal_submit(api, "roomy")  # a count is read and kept
    counts = api.app.state.queued_counts
    real_count = counts.read
    release = threading.Event()  # set by the test; the read waits on the server's loop
    started: list[str] = []

    async def slow_count(tenant):  # type: ignore[no-untyped-def]
        started.append(tenant)
        await asyncio.to_thread(release.wait, 30)
        return await real_count(tenant)

    monkeypatch.setattr(counts, "read", slow_count)
    try:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=20) as client:
            answers = [
                await client.post("/fal-ai/flux/dev", json=FAL_BODY, headers=as_("roomy")) for _ in range(3)
            ]
        assert [answer.status_code for answer in answers] == [200] * 3
        assert started == ["roomy"]  # one refresh, in the background, shared by the three
    finally:
        release.set()


def test_the_queued_counts_of_quota_keys_are_read_at_start_up(tmp_path):
    """So that a tenant's first burst waits for no count read (server/api/queued_counts.py)."""
    save(tmp_path / "keys.json", key_entries())
    with run_api_server(api_settings(tmp_path)) as api:
        counts = api.app.state.queued_counts
        wait_until(lambda: counts.known("tight") and counts.known("roomy"), 10, "the counts read")
        assert counts.known("tight").value == 0 and counts.known("team-a") is None  # no quota
