"""API keys on the fal routes: Key, Bearer, x-key; public routes stay public; auth off."""

from __future__ import annotations

import pytest

from server.api.auth import key_is_valid
from server.config import Settings
from server.tenants.keys import auth_enabled
from tests.server.conftest import api_settings, run_api_server


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("auth")
    keys_file = data_dir / "keys.txt"
    keys_file.write_text("# team keys\nfile-key\n")
    settings = api_settings(data_dir).model_copy(
        update={"api_key": ["secret", "id:sec"], "api_keys_file": keys_file}
    )
    with run_api_server(settings) as server:
        yield server


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Key secret"},
        {"authorization": "Bearer secret"},
        {"Authorization": "key id:sec"},
        {"x-key": "secret"},
        {"Authorization": "Key file-key"},
    ],
)
def test_valid_keys_are_accepted(secured, headers):
    response = secured.client.post("/fal-ai/flux/dev", json={"prompt": "p"}, headers=headers)
    assert response.status_code == 200, response.text
    request_id = response.json()["request_id"]
    assert (
        secured.client.get(f"/fal-ai/flux/requests/{request_id}/status", headers=headers).status_code == 202
    )
    secured.drain()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Key wrong"},
        {"Authorization": "Bearer secre"},
        {"Authorization": "Key id"},
        {"Authorization": "Basic secret"},
        {"x-key": "nope"},
    ],
)
def test_missing_or_wrong_keys_are_401(secured, headers):
    for method, path in [
        ("POST", "/fal-ai/flux/dev"),
        ("GET", "/fal-ai/flux/requests/x/status"),
        ("GET", "/fal-ai/flux/requests/x"),
        ("PUT", "/fal-ai/flux/requests/x/cancel"),
        ("POST", "/run/fal-ai/flux/dev"),
    ]:
        response = secured.client.request(method, path, json={"prompt": "p"}, headers=headers)
        assert response.status_code == 401, (method, path)
        assert isinstance(response.json()["detail"], str)
    proxied = secured.client.post(
        "/api/fal/proxy",
        json={"prompt": "p"},
        headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/flux/dev", **headers},
    )
    assert proxied.status_code == 401
    assert secured.worker.depth() == 0


def test_public_routes_need_no_key(secured):
    assert secured.client.get("/health").status_code == 503  # no worker, but not 401
    # Files need no key, but with auth on their URL's signature (docs/tenants.md).
    name = "AAAAAAAAAAAAAAAAAAAAAAAA.png"
    assert secured.client.get(f"/files/{name}").status_code == 403
    signature = secured.app.state.url_signer.segment(name)
    assert secured.client.get(f"/files/{signature}/{name}").status_code == 404  # signed, but no such file
    jwks = secured.client.get("/.well-known/jwks.json")
    assert jwks.status_code == 200 and jwks.json()["keys"]


def test_auth_off_without_keys(api):
    assert not auth_enabled(api.settings)
    assert api.client.post("/fal-ai/flux/dev", json={"prompt": "p"}).status_code == 200
    assert (
        api.client.post(
            "/fal-ai/flux/dev", json={"prompt": "p"}, headers={"Authorization": "Key any"}
        ).status_code
        == 200
    )


def test_key_is_valid_compares_whole_keys():
    settings = Settings(api_key=["id:secret"])
    assert key_is_valid(settings, "id:secret")
    assert not key_is_valid(settings, "id")
    assert not key_is_valid(settings, "secret")
    assert not key_is_valid(settings, None)
    assert key_is_valid(Settings(api_key=[]), None)
