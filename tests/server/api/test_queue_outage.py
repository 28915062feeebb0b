"""A PostgreSQL queue that goes away: every protocol answers 503 in its own error shape (never
a hang, never a 500), and the same API process serves again once the server is back."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from server.tenants import Quotas, Role
from server.tenants.keys import KeyEntry, KeysFile, hash_token, new_token, save
from tests.pg_server import PostgresServer, remove, start_postgres
from tests.server.conftest import ApiServer, api_settings, run_api_server
from tests.support import error_body

FAL_SUBMIT = ("POST", "/fal-ai/flux/dev", {"prompt": "a fox"})
BFL_SUBMIT = ("POST", "/v1/flux-dev", {"prompt": "a fox", "width": 256, "height": 256})
OPENAI = ("POST", "/v1/images/generations", {"prompt": "a fox", "size": "256x256"})


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = start_postgres(tmp_path_factory.mktemp("postgres-for-outage"))
    yield server
    remove(server)


@pytest.fixture
def api(own_postgres: PostgresServer, tmp_path) -> Iterator[ApiServer]:
    settings = api_settings(tmp_path / "data", queue_url=own_postgres.fresh_database_url())
    with run_api_server(settings) as server:
        yield server


def call(api: ApiServer, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return api.client.request(method, path, json=body)


def test_every_protocol_answers_503_in_its_shape_then_recovers(
    api: ApiServer, own_postgres: PostgresServer
) -> None:
    request_id = api.submit()["request_id"]
    bfl_id = call(api, *BFL_SUBMIT).json()["id"]
    own_postgres.stop()
    try:
        started = time.monotonic()
        fal = call(api, *FAL_SUBMIT)
        assert fal.status_code == 503 and set(error_body(fal)) == {"detail"}
        status = call(api, "GET", f"/fal-ai/flux/requests/{request_id}/status")
        assert status.status_code == 503 and "unavailable" in status.json()["detail"]
        bfl = call(api, "GET", f"/v1/get_result?id={bfl_id}")
        assert bfl.status_code == 503 and "detail" in bfl.json()
        assert call(api, *BFL_SUBMIT).status_code == 503
        openai = call(api, *OPENAI)
        assert openai.status_code == 503
        error = openai.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        health = call(api, "GET", "/health")
        assert health.status_code == 503
        assert time.monotonic() - started < 40  # six answers, none of them a hang
    finally:
        own_postgres.start()

    # The same process reconnects by itself; nothing that was queued is lost.
    deadline = time.monotonic() + 20
    while (status := call(api, "GET", f"/fal-ai/flux/requests/{request_id}/status")).status_code != 202:
        assert time.monotonic() < deadline, status.text
        time.sleep(0.2)
    assert status.json()["status"] == "IN_QUEUE"
    assert call(api, *FAL_SUBMIT).status_code == 200
    assert call(api, "GET", f"/v1/get_result?id={bfl_id}").json()["status"] == "Pending"


def test_a_quota_keys_submit_is_503_while_its_count_cannot_be_read_then_admitted(
    own_postgres: PostgresServer, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key with a `queued` quota makes a submit with no count kept read the tenant's count
    from the queue (server/api/queued_counts.py): with the database down that read fails for
    every waiting submit at once, as a 503, and a failed read is not kept: the next submit
    reads again."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    token = new_token()
    entry = KeyEntry(name="team", role=Role.USER, sha256=hash_token(token), quotas=Quotas(queued=5))
    save(data_dir / "keys.json", KeysFile().with_entry(entry))
    settings = api_settings(data_dir, queue_url=own_postgres.fresh_database_url())
    with run_api_server(settings) as api:
        headers = {"authorization": f"Key {token}"}
        assert (
            api.client.post("/fal-ai/flux/dev", json={"prompt": "a fox"}, headers=headers).status_code == 200
        )
        own_postgres.stop()
        try:
            api.app.state.queued_counts.forget()  # as after a restart: the count must be read
            refused = api.client.post("/fal-ai/flux/dev", json={"prompt": "a fox"}, headers=headers)
            assert refused.status_code == 503 and set(error_body(refused)) == {"detail"}
        finally:
            own_postgres.start()
        deadline = time.monotonic() + 20
        while (
            answer := api.client.post("/fal-ai/flux/dev", json={"prompt": "a fox"}, headers=headers)
        ).status_code != 200:
            assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert api.worker.active_count("team") == 2
