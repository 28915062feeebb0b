"""Webhooks end to end: a real local HTTP receiver that verifies fal signatures against the
served JWKS and BFL HMACs, sees retries with backoff, and still receives a delivery that was
pending while the server restarted."""

from __future__ import annotations

import http.server
import itertools
import json
import threading
import time
from pathlib import Path
from urllib.parse import quote

from e2e_support import small_input, status

from server.api.webhooks.keys import public_keys_from_jwks
from server.api.webhooks.signing import verify_bfl_signature, verify_fal_signature
from server.config import Settings
from server.queue.factory import open_queue
from tests.support import free_port, wait_until

FAST_RETRIES = ["--webhook-retry-base-seconds", "0.2"]


class Receiver:
    """A loopback webhook receiver: answers the scripted statuses for a path, then 200."""

    def __init__(self, scripts: dict[str, list[int]] | None = None, port: int = 0) -> None:
        self.scripts = {path: list(codes) for path, codes in (scripts or {}).items()}
        self.calls: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                script = receiver.scripts.get(self.path, [])
                code = script.pop(0) if script else 200
                receiver.calls.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers.items()),
                        "body": body,
                        "at": time.monotonic(),
                    }
                )
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def calls_to(self, path: str) -> list[dict]:
        return [call for call in self.calls if call["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def delivered(server, *request_ids: str) -> bool:
    """The queue's own mark: each request's delivery row says it was delivered."""
    queue = open_queue(Settings(data_dir=server.data_dir), role="test")
    try:
        rows = [queue.delivery(request_id) for request_id in request_ids]
    finally:
        queue.close()
    return all(row is not None and row.delivered_at is not None for row in rows)


def served_keys(server) -> list:
    with server.client() as client:
        return public_keys_from_jwks(client.get("/.well-known/jwks.json").json())


def submit_fal(server, hook_url: str) -> str:
    with server.client() as client:
        response = client.post(f"/fal-ai/flux/dev?fal_webhook={quote(hook_url, safe='')}", json=small_input())
        assert response.status_code == 200, response.text
        return response.json()["request_id"]


def test_signed_deliveries_with_retries(start_flux_server) -> None:
    receiver = Receiver({"/fal": [500, 500]})
    server = start_flux_server(args=FAST_RETRIES)
    try:
        request_id = submit_fal(server, f"{receiver.base}/fal")
        with server.client() as client:
            bfl = client.post(
                "/v1/flux-dev",
                json={
                    "prompt": "a boat",
                    "width": 256,
                    "height": 256,
                    "steps": 2,
                    "seed": 9,
                    "webhook_url": f"{receiver.base}/bfl",
                    "webhook_secret": "hmac-secret",
                },
            ).json()
        wait_until(lambda: delivered(server, request_id, bfl["id"]), 120, "both deliveries")

        # fal: three signed attempts, 0.2 s then 0.4 s apart, each verifiable with the JWKS.
        keys = served_keys(server)
        fal_calls = receiver.calls_to("/fal")
        assert len(fal_calls) == 3
        for call in fal_calls:
            assert verify_fal_signature(call["headers"], call["body"], keys)
            assert call["headers"]["X-Fal-Webhook-User-Id"] == "flux-server"
        payload = json.loads(fal_calls[-1]["body"])
        assert payload["request_id"] == payload["gateway_request_id"] == request_id
        assert payload["status"] == "OK" and payload["payload"]["images"][0]["width"] == 64
        gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(fal_calls)]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps

        # The attempts show in the request's status logs.
        with server.client() as client:
            wait_until(
                lambda: any(
                    entry["message"] == "Webhook delivered (attempt 3)"
                    for entry in status(client, request_id)["logs"]
                ),
                10,
                "the delivery log line",
            )
            messages = [entry["message"] for entry in status(client, request_id)["logs"]]
        assert "Webhook delivery attempt 1 failed: HTTP 500; retrying in 0.2 s" in messages
        assert "Webhook delivery attempt 2 failed: HTTP 500; retrying in 0.4 s" in messages

        # BFL: one delivery, HMAC-signed, whose sample is fetchable.
        (bfl_call,) = receiver.calls_to("/bfl")
        assert verify_bfl_signature(
            "hmac-secret", bfl_call["body"], bfl_call["headers"].get("X-BFL-Signature")
        )
        assert not verify_bfl_signature(
            "other-secret", bfl_call["body"], bfl_call["headers"].get("X-BFL-Signature")
        )
        bfl_payload = json.loads(bfl_call["body"])
        assert bfl_payload["id"] == bfl["id"] and bfl_payload["status"] == "Ready"
        with server.client() as client:
            assert client.get(bfl_payload["result"]["sample"]).status_code == 200
    finally:
        receiver.close()


def test_pending_delivery_survives_a_restart(start_flux_server, tmp_path: Path) -> None:
    data_dir = tmp_path / "restart-data"
    port = free_port()  # nobody listens yet: every attempt is refused
    server = start_flux_server(data_dir=data_dir, args=FAST_RETRIES)
    keys_before = served_keys(server)
    request_id = submit_fal(server, f"http://127.0.0.1:{port}/hook")
    with server.client() as client:
        wait_until(
            lambda: any(
                "attempt 1 failed" in entry["message"] for entry in status(client, request_id)["logs"]
            ),
            120,
            "a failed first attempt",
        )
    server.stop()

    receiver = Receiver(port=port)
    try:
        restarted = start_flux_server(data_dir=data_dir, args=FAST_RETRIES)
        wait_until(lambda: delivered(restarted, request_id), 60, "the delivery after the restart")
        (call,) = receiver.calls
        keys_after = served_keys(restarted)
        assert [k.public_bytes_raw() for k in keys_after] == [k.public_bytes_raw() for k in keys_before]
        assert verify_fal_signature(call["headers"], call["body"], keys_after)
        assert json.loads(call["body"])["request_id"] == request_id
        with restarted.client() as client:
            wait_until(
                lambda: any(
                    entry["message"].startswith("Webhook delivered (attempt ")
                    for entry in status(client, request_id)["logs"]
                ),
                10,
                "the delivery log line",
            )
    finally:
        receiver.close()
