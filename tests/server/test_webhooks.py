"""Webhooks: keys and JWKS, fal/BFL signatures, payloads, allow-list, backoff, and the
dispatcher delivering from a real SQLite queue to a real local HTTP receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.server
import itertools
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server import keys, webhooks
from server.config import Settings
from server.jobs import Job, JobError, JobRecord, JobResult, OutputImage, Status, Webhook
from server.queue.sqlite import SQLiteQueue

# --- keys and JWKS -----------------------------------------------------------------------------


def test_key_is_generated_once_with_0600_and_reloaded(tmp_path: Path) -> None:
    first = keys.load_or_create_private_key(tmp_path)
    path = keys.key_path(tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    keys._cache.clear()  # a new process
    second = keys.load_or_create_private_key(tmp_path)
    assert keys.raw_public_bytes(first.public_key()) == keys.raw_public_bytes(second.public_key())


def test_jwks_shape_round_trips(tmp_path: Path) -> None:
    public = keys.load_or_create_private_key(tmp_path).public_key()
    document = keys.jwks([public])
    (jwk,) = document["keys"]
    assert {k: jwk[k] for k in ("kty", "crv", "use", "alg")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "use": "sig",
        "alg": "EdDSA",
    }
    raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    assert raw == keys.raw_public_bytes(public) and len(raw) == 32
    assert "=" not in jwk["x"] and jwk["kid"]
    (parsed,) = keys.public_keys_from_jwks(json.loads(json.dumps(document)))
    assert keys.raw_public_bytes(parsed) == raw


# --- signatures ----------------------------------------------------------------------------


def test_fal_signature_follows_the_documented_message() -> None:
    key = Ed25519PrivateKey.generate()
    body = b'{"request_id": "r1", "status": "OK"}'
    headers = webhooks.fal_signature_headers(
        body, request_id="r1", user_id="u1", key=key, timestamp=1700000000
    )
    assert headers["X-Fal-Webhook-Request-Id"] == "r1"
    assert headers["X-Fal-Webhook-User-Id"] == "u1"
    assert headers["X-Fal-Webhook-Timestamp"] == "1700000000"
    # Verify independently of our helper: the message fal documents, the raw signature bytes.
    message = f"r1\nu1\n1700000000\n{hashlib.sha256(body).hexdigest()}".encode()
    key.public_key().verify(bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message)

    public = [key.public_key()]
    assert webhooks.verify_fal_signature(headers, body, public, now=1700000100)
    assert not webhooks.verify_fal_signature(headers, body + b" ", public, now=1700000100)
    assert not webhooks.verify_fal_signature(headers, body, public, now=1700000000 + 301)
    assert not webhooks.verify_fal_signature(headers, body, [Ed25519PrivateKey.generate().public_key()])
    lowered = {name.lower(): value for name, value in headers.items()}
    assert webhooks.verify_fal_signature(lowered, body, public, now=1700000000)


def test_bfl_signature_is_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"id":"x","status":"Ready"}'
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert webhooks.bfl_signature("s3cret", body) == expected
    assert webhooks.verify_bfl_signature("s3cret", body, expected)
    assert not webhooks.verify_bfl_signature("other", body, expected)
    assert not webhooks.verify_bfl_signature("s3cret", body, None)


# --- policy --------------------------------------------------------------------------------


def test_backoff_schedule_spans_about_two_hours_over_ten_attempts() -> None:
    delays = [webhooks.retry_delay(n) for n in range(1, webhooks.MAX_ATTEMPTS)]
    assert delays == [15, 30, 60, 120, 240, 480, 960, 1920, 3600]
    assert 1.9 * 3600 < sum(delays) < 2.2 * 3600
    assert webhooks.retry_delay(3, base=0.2) == pytest.approx(0.8)


def test_allow_list_and_url_checks() -> None:
    open_settings = Settings(webhook_allowlist=[])
    assert webhooks.validate_webhook_url("http://anything.example:9000/hook", open_settings)
    for bad in ("ftp://example.com/x", "example.com/hook", "http:///nohost"):
        with pytest.raises(ValueError):
            webhooks.validate_webhook_url(bad, open_settings)

    listed = Settings(webhook_allowlist="hooks.example.com, *.internal.test")
    assert webhooks.validate_webhook_url("https://hooks.example.com/a", listed)
    assert webhooks.validate_webhook_url("https://HOOKS.example.com./a", listed)
    assert webhooks.validate_webhook_url("https://ci.internal.test/a", listed)
    for refused in ("https://evil.example.com/a", "https://internal.test.evil.com/a", "http://127.0.0.1/a"):
        with pytest.raises(ValueError, match="allow-list"):
            webhooks.validate_webhook_url(refused, listed)


# --- payloads ------------------------------------------------------------------------------


def make_record(kind: str, *, error: JobError | None = None, flagged: bool = False) -> JobRecord:
    job = Job(
        prompt="a red fox",
        width=256,
        height=256,
        seed=7,
        protocol="fal" if kind == "fal" else "bfl",
        webhook=Webhook(url="http://127.0.0.1:1/hook", kind=kind, secret="s" if kind == "bfl" else None),
        base_url="https://flux.local:8443",
        safety_tolerance=None if kind == "fal" else 2,
    )
    result = None
    if error is None:
        image = OutputImage(
            width=256, height=256, content_type="image/jpeg", file_name="abc.jpeg", file_size=10
        )
        result = JobResult(
            images=[image],
            seed=7,
            prompt="a red fox",
            has_nsfw_concepts=[flagged],
            nsfw_checked=True,
            timings={"inference": 0.5},
            preset="none",
        )
    now = time.time()
    return JobRecord(
        id="req-1",
        job=job,
        status=Status.COMPLETED,
        started_at=now - 1,
        completed_at=now,
        result=result,
        error=error,
    )


def test_fal_payload_ok_and_error() -> None:
    ok = webhooks.fal_webhook_payload(make_record("fal"))
    assert ok["request_id"] == ok["gateway_request_id"] == "req-1"
    assert ok["status"] == "OK" and ok["error"] is None and ok["payload_error"] is None
    assert ok["payload"]["images"][0]["url"] == "https://flux.local:8443/files/abc.jpeg"
    assert ok["payload"]["seed"] == 7

    failed = make_record("fal", error=JobError(message="boom", error_type="internal", status_code=500))
    body = webhooks.fal_webhook_payload(failed)
    assert body["status"] == "ERROR"
    assert body["error"] == "Invalid status code: 500"
    assert body["payload"]["detail"] == "boom"


def test_bfl_payloads_and_signed_delivery(tmp_path: Path) -> None:
    ready = make_record("bfl")
    body, headers = webhooks.render_delivery(ready, Settings(data_dir=tmp_path))
    payload = json.loads(body)
    assert payload["id"] == "req-1" and payload["status"] == "Ready"
    assert payload["result"]["sample"] == "https://flux.local:8443/files/abc.jpeg"
    assert payload["result"]["seed"] == 7 and payload["result"]["prompt"] == "a red fox"
    assert payload["timestamp"]
    assert headers["X-BFL-Signature"] == webhooks.bfl_signature("s", body)

    moderated = json.loads(
        webhooks.render_delivery(make_record("bfl", flagged=True), Settings(data_dir=tmp_path))[0]
    )
    assert moderated["status"] == "Content Moderated" and moderated["result"] is None

    error = make_record(
        "bfl", error=JobError(message="out of memory", error_type="internal", status_code=500)
    )
    failed = json.loads(webhooks.render_delivery(error, Settings(data_dir=tmp_path))[0])
    assert failed["status"] == "Error" and failed["message"] == "out of memory"


# --- the dispatcher against a real receiver ---------------------------------------------------


class Receiver:
    """A loopback HTTP server answering with scripted statuses (then 200), recording calls."""

    def __init__(self, statuses: list[int], hang_paths: tuple[str, ...] = ()) -> None:
        self.statuses = list(statuses)
        self.calls: list[tuple[str, dict[str, str], bytes, float]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.calls.append((self.path, dict(self.headers.items()), body, time.monotonic()))
                if self.path in hang_paths:
                    time.sleep(3)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SQLiteQueue]:
    q = SQLiteQueue(tmp_path / "queue.sqlite3", tmp_path / "run", role="api")
    yield q
    q.close()


def finish(queue: SQLiteQueue, webhook: Webhook) -> str:
    """Put a job through the queue's consumer side, as a worker would."""
    record = queue.submit(Job(prompt="p", width=64, height=64, seed=1, webhook=webhook, protocol="fal"))
    claimed = queue.claim("w-test", timeout=2)
    assert claimed is not None and claimed.id == record.id
    image = OutputImage(width=64, height=64, content_type="image/jpeg", file_name="f.jpeg", file_size=1)
    result = JobResult(
        images=[image],
        seed=1,
        prompt="p",
        has_nsfw_concepts=[False],
        nsfw_checked=False,
        timings={},
        preset="none",
    )
    assert queue.complete(record.id, "w-test", result)
    return record.id


async def run_dispatcher_until(
    dispatcher: webhooks.WebhookDispatcher, done: Callable[[], bool], timeout: float
) -> None:
    task = asyncio.create_task(dispatcher.run())
    deadline = time.monotonic() + timeout
    try:
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_dispatcher_retries_with_backoff_then_delivers(tmp_path: Path, queue: SQLiteQueue) -> None:
    receiver = Receiver([500, 500])
    settings = Settings(data_dir=tmp_path, webhook_retry_base_seconds=0.2)
    try:
        request_id = finish(queue, Webhook(url=receiver.url + "/hook", kind="fal"))
        dispatcher = webhooks.WebhookDispatcher(settings, queue)
        store = webhooks.DeliveryStore(queue.connect)
        asyncio.run(run_dispatcher_until(dispatcher, lambda: len(receiver.calls) >= 3, timeout=20))
        time.sleep(0.2)  # the success is recorded right after the third answer
        assert len(receiver.calls) == 3
        gaps = [b[3] - a[3] for a, b in itertools.pairwise(receiver.calls)]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # 0.2 s, then doubled
        delivery = store.get(request_id)
        assert delivery is not None and delivery.attempts == 3 and delivery.delivered_at is not None
        assert not delivery.gave_up
        store.close()

        public = [keys.load_or_create_private_key(tmp_path).public_key()]
        for _, headers, body, _ in receiver.calls:
            assert webhooks.verify_fal_signature(headers, body, public)
            assert json.loads(body)["request_id"] == request_id

        record = queue.get(request_id)
        assert record is not None
        messages = [entry.message for entry in record.logs]
        assert "Webhook delivery attempt 1 failed: HTTP 500; retrying in 0.2 s" in messages
        assert "Webhook delivery attempt 2 failed: HTTP 500; retrying in 0.4 s" in messages
        assert "Webhook delivered (attempt 3)" in messages
    finally:
        receiver.close()


def test_gives_up_after_max_attempts(
    tmp_path: Path, queue: SQLiteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "MAX_ATTEMPTS", 3)
    receiver = Receiver([503] * 10)
    settings = Settings(data_dir=tmp_path, webhook_retry_base_seconds=0.05)
    try:
        request_id = finish(queue, Webhook(url=receiver.url + "/hook", kind="bfl", secret="k"))
        store = webhooks.DeliveryStore(queue.connect)
        dispatcher = webhooks.WebhookDispatcher(settings, queue)
        asyncio.run(
            run_dispatcher_until(dispatcher, lambda: bool((d := store.get(request_id)) and d.gave_up), 20)
        )
        delivery = store.get(request_id)
        store.close()
        assert delivery is not None and delivery.gave_up and delivery.attempts == 3
        assert delivery.last_error == "HTTP 503" and delivery.delivered_at is None
        assert len(receiver.calls) == 3
        _, headers, body, _ = receiver.calls[0]
        assert webhooks.verify_bfl_signature("k", body, headers.get("X-BFL-Signature"))
        record = queue.get(request_id)
        assert record is not None
        assert record.logs[-1].message == "Webhook delivery attempt 3 failed: HTTP 503; giving up"
    finally:
        receiver.close()


def test_a_hanging_receiver_does_not_block_other_deliveries(
    tmp_path: Path, queue: SQLiteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhooks, "TOTAL_TIMEOUT_SECONDS", 1.0)
    receiver = Receiver([], hang_paths=("/slow",))
    settings = Settings(data_dir=tmp_path, webhook_retry_base_seconds=60)
    try:
        slow_id = finish(queue, Webhook(url=receiver.url + "/slow", kind="fal"))
        fast_id = finish(queue, Webhook(url=receiver.url + "/fast", kind="fal"))
        store = webhooks.DeliveryStore(queue.connect)
        dispatcher = webhooks.WebhookDispatcher(settings, queue)
        started = time.monotonic()
        fast_done: list[float] = []

        def done() -> bool:
            fast = store.get(fast_id)
            if fast and fast.delivered_at and not fast_done:
                fast_done.append(time.monotonic() - started)
            slow = store.get(slow_id)
            return bool(fast_done and slow and slow.attempts == 1)

        asyncio.run(run_dispatcher_until(dispatcher, done, timeout=15))
        slow = store.get(slow_id)
        store.close()
        assert fast_done and fast_done[0] < 1.0  # not queued behind the hanging one
        assert slow is not None and slow.last_error == "timed out" and slow.delivered_at is None
        assert not slow.gave_up and slow.due_at > time.time() + 30  # retried later, not dropped
    finally:
        receiver.close()
