"""`GET /admin/usage` and the usage counters of /metrics, after jobs of known sizes: exact
pixels, JSON and CSV agreeing, tenants apart, failures counted as requests only, non-admin
keys refused."""

from __future__ import annotations

import csv
import io
import time

import pytest

from server.jobs import Job, JobError
from server.queue.usage import utc_day
from server.tenants import Role
from server.tenants.keys import KeyEntry, KeysFile, hash_token, new_token, save
from tests.server.conftest import ApiServer, api_settings, run_api_server


def finish_one(api: ApiServer, request_id: str) -> None:
    api.complete(api.claim(request_id))


def test_usage_in_json_and_csv_and_metrics(api: ApiServer) -> None:
    today = utc_day(time.time())
    # Two images of 512x512 and one of 1024x768 on fal-ai/flux for no named key ("default").
    finish_one(
        api,
        api.submit("/fal-ai/flux/dev", {"prompt": "a", "image_size": "square", "num_images": 2})[
            "request_id"
        ],
    )
    finish_one(
        api, api.submit("/fal-ai/flux/dev", {"prompt": "b", "image_size": "landscape_4_3"})["request_id"]
    )
    # One failed request: a request, no images.
    failing = api.submit("/fal-ai/flux/dev", {"prompt": "c"})["request_id"]
    api.fail(api.claim(failing), JobError(message="boom", error_type="internal_server_error"))
    # A tenant's job (its key's name), stored through the queue.
    acme = api.worker.submit(Job(prompt="d", width=256, height=256, tenant="acme", app_id="fal-ai/flux")).id
    finish_one(api, acme)

    answer = api.client.get("/admin/usage", params={"from": today, "to": today})
    assert answer.status_code == 200
    rows = {(row["tenant"], row["endpoint"]): row for row in answer.json()["rows"]}
    pixels = 2 * 512 * 512 + 1024 * 768
    assert rows[("default", "fal-ai/flux")] == {
        "day": today,
        "tenant": "default",
        "endpoint": "fal-ai/flux",
        "requests": 3,
        "failed": 1,
        "images": 3,
        "pixels": pixels,
        "megapixels": pixels / 1e6,
        "gpu_seconds": 0.5,  # the test worker reports 0.25 s of inference per job
    }
    assert rows[("acme", "fal-ai/flux")]["pixels"] == 256 * 256
    assert rows[("acme", "fal-ai/flux")]["images"] == 1

    as_csv = api.client.get("/admin/usage", params={"from": today, "to": today, "format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [
        {**row, **{k: float(row[k]) if k in ("megapixels", "gpu_seconds") else row[k] for k in row}}
        for row in parsed
    ] == [
        {k: (v if isinstance(v, float) else str(v)) for k, v in row.items()} for row in answer.json()["rows"]
    ]
    assert api.client.get("/admin/usage", params={"to": "2000-01-01"}).json()["rows"] == []

    metrics = api.client.get("/metrics").text
    assert 'fluxserver_tenant_requests_total{endpoint="fal-ai/flux",tenant="default"} 3.0' in metrics
    assert 'fluxserver_tenant_failed_requests_total{endpoint="fal-ai/flux",tenant="default"} 1.0' in metrics
    assert (
        f'fluxserver_tenant_megapixels_total{{endpoint="fal-ai/flux",tenant="acme"}} {256 * 256 / 1e6}'
        in metrics
    )
    assert 'fluxserver_tenant_gpu_seconds_total{endpoint="fal-ai/flux",tenant="acme"} 0.25' in metrics


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"from": "yesterday"}, 422),
        ({"from": "2026-02-30"}, 422),
        ({"from": "2026-02-02", "to": "2026-02-01"}, 422),
        ({"format": "xml"}, 422),
    ],
)
def test_bad_ranges_and_formats_are_422(api: ApiServer, params: dict, status: int) -> None:
    answer = api.client.get("/admin/usage", params=params)
    assert answer.status_code == status and "detail" in answer.json()


def test_a_user_key_is_refused_and_an_admin_key_reads_it(tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = tmp_path_factory.mktemp("usage-roles")
    user, admin = new_token(), new_token()
    keys = KeysFile()
    for name, token, role in (("acme", user, Role.USER), ("boss", admin, Role.ADMIN)):
        keys = keys.with_entry(KeyEntry(name=name, role=role, sha256=hash_token(token)))
    save(data_dir / "keys.json", keys)
    with run_api_server(api_settings(data_dir)) as server:
        answer = server.client.get("/admin/usage", headers={"Authorization": f"Key {user}"})
        assert answer.status_code == 403 and answer.json() == {"detail": "Usage is for admin keys only"}
        assert server.client.get("/admin/usage", headers={"Authorization": f"Key {admin}"}).status_code == 200


def test_usage_needs_a_key_when_auth_is_on(tmp_path_factory: pytest.TempPathFactory) -> None:
    with run_api_server(api_settings(tmp_path_factory.mktemp("usage-auth"), api_key=["admin-key"])) as server:
        assert server.client.get("/admin/usage").status_code == 401
        assert server.client.get("/admin/usage", headers={"Authorization": "Key wrong"}).status_code == 401
        answer = server.client.get("/admin/usage", headers={"Authorization": "Bearer admin-key"})
        assert answer.status_code == 200 and answer.json() == {"from": None, "to": None, "rows": []}
