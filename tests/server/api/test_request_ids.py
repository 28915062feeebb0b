"""Every HTTP answer carries its own request id (`x-request-id`); a 5xx body carries it too,
and an unexpected exception's text stays in the log line that names that id, on every
protocol (server/api/request_ids.py, server/api/errors.py)."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.server.conftest import ApiServer
from tests.support import error_body

SECRET = "RuntimeError at /srv/flux/secret.py: 31.5 GiB allocated"


def test_every_answer_has_its_own_request_id(api: ApiServer) -> None:
    ok = api.client.get("/health/live")
    missing = api.client.get("/fal-ai/flux/requests/nope/status")
    assert missing.status_code == 404
    ids = {ok.headers["x-request-id"], missing.headers["x-request-id"]}
    assert len(ids) == 2 and all(len(i) == 32 for i in ids)
    # A client's own x-request-id is not taken over: the server's ids stay unique and its own.
    mine = api.client.get("/health/live", headers={"x-request-id": "forged"})
    assert mine.headers["x-request-id"] not in ("forged", *ids)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/fal-ai/flux/dev", {"prompt": "p"}),
        ("/v1/flux-dev", {"prompt": "p", "width": 512, "height": 512}),
        ("/v1/images/generations", {"prompt": "p", "size": "256x256"}),
    ],
)
def test_an_unexpected_error_answers_500_with_the_id_and_logs_the_text(
    api: ApiServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, path: str, body: dict
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(api.app.state.async_queue, "submit", broken)
    with caplog.at_level(logging.ERROR):
        # A connection of its own: uvicorn closes one whose app raised (the answer sent first).
        response = httpx.post(api.base_url + path, json=body, timeout=20)
    assert response.status_code == 500
    assert SECRET not in response.text and "secret" not in response.text
    request_id = response.headers["x-request-id"]
    rest = error_body(response)  # the body's request_id is the header's
    assert rest  # and the protocol's own fields are still there
    (logged,) = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged.exc_info is not None and str(logged.exc_info[1]) == SECRET
