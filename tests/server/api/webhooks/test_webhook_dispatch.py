"""The dispatcher delivering from a real queue to a real local HTTP receiver: backoff, giving
up, and a hanging receiver that does not hold up the others. Each test waits for the queue's
delivery marks, never for a fixed time."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.api.protocols.bfl import webhook as bfl_webhook
from server.api.protocols.fal import webhook as fal_webhook
from server.api.webhooks import dispatch, keys
from server.api.webhooks.signing import verify_bfl_signature, verify_fal_signature
from server.config import Settings
from server.jobs import Job, JobResult, OutputImage, Webhook
from server.queue.base import JobQueue
from server.queue.factory import open_queue
from tests.support import LOOPBACK_OUTBOUND


def test_backoff_schedule_spans_about_two_hours_over_ten_attempts() -> None:
    delays = [dispatch.retry_delay(n) for n in range(1, dispatch.MAX_ATTEMPTS)]
    assert delays == [15, 30, 60, 120, 240, 480, 960, 1920, 3600]
    assert 1.9 * 3600 < sum(delays) < 2.2 * 3600
    assert dispatch.retry_delay(3, base=0.2) == pytest.approx(0.8)


class Receiver:
    """A loopback HTTP server answering with scripted statuses (then 200), recording calls.
    Requests to `hang_paths` get no answer until the receiver closes; to `endless_paths`, a
    200 with a body that never ends (until the client hangs up)."""

    def __init__(
        self, statuses: list[int], hang_paths: tuple[str, ...] = (), endless_paths: tuple[str, ...] = ()
    ) -> None:
        self.statuses = list(statuses)
        self.calls: list[tuple[str, dict[str, str], bytes, float]] = []
        self.closing = threading.Event()
        self.hung_up = threading.Event()
        self.sent = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                receiver.calls.append((self.path, dict(self.headers.items()), body, time.monotonic()))
                if self.path in endless_paths:
                    self.send_response(200)
                    self.end_headers()  # no length: the body lasts until the connection closes
                    chunk = b"x" * 65536
                    try:
                        while not receiver.closing.is_set():
                            self.wfile.write(chunk)
                            receiver.sent += len(chunk)
                    except OSError:  # the client hung up: what a dispatcher should do
                        receiver.hung_up.set()
                    return
                if self.path in hang_paths:
                    receiver.closing.wait(30)
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
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[JobQueue]:
    q = open_queue(Settings(data_dir=tmp_path), role="api")
    yield q
    q.close()


def make_dispatcher(settings: Settings, queue: JobQueue) -> dispatch.WebhookDispatcher:
    """The dispatcher with the protocols' renderers, as the app builds it."""
    renderers = {"fal": fal_webhook.webhook_renderer(settings), "bfl": bfl_webhook.render_webhook}
    return dispatch.WebhookDispatcher(settings, queue, renderers)


def finish(queue: JobQueue, webhook: Webhook) -> str:
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
    dispatcher: dispatch.WebhookDispatcher, done: Callable[[], bool], timeout: float
) -> None:
    """Run the dispatcher until `done()` (a read of the queue's delivery marks) holds."""
    task = asyncio.create_task(dispatcher.run())
    deadline = time.monotonic() + timeout
    try:
        while not await asyncio.to_thread(done):
            assert time.monotonic() < deadline, "the deliveries did not reach the expected state"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_dispatcher_retries_with_backoff_then_delivers(tmp_path: Path, queue: JobQueue) -> None:
    receiver = Receiver([500, 500])
    settings = Settings(data_dir=tmp_path, outbound_allow=LOOPBACK_OUTBOUND, webhook_retry_base_seconds=0.2)
    try:
        request_id = finish(queue, Webhook(url=receiver.url + "/hook", kind="fal"))

        def delivered() -> bool:
            delivery = queue.delivery(request_id)
            return delivery is not None and delivery.delivered_at is not None

        asyncio.run(run_dispatcher_until(make_dispatcher(settings, queue), delivered, timeout=20))
        assert len(receiver.calls) == 3
        gaps = [b[3] - a[3] for a, b in itertools.pairwise(receiver.calls)]
        assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # 0.2 s, then doubled
        delivery = queue.delivery(request_id)
        assert delivery is not None and delivery.attempts == 3 and not delivery.gave_up

        public = [keys.load_or_create_private_key(tmp_path).public_key()]
        for _, headers, body, _ in receiver.calls:
            assert verify_fal_signature(headers, body, public)
            assert json.loads(body)["request_id"] == request_id
            assert headers["User-Agent"] == dispatch.USER_AGENT

        record = queue.get(request_id)
        assert record is not None
        messages = [entry.message for entry in record.logs]
        assert "Webhook delivery attempt 1 failed: HTTP 500; retrying in 0.2 s" in messages
        assert "Webhook delivery attempt 2 failed: HTTP 500; retrying in 0.4 s" in messages
        assert "Webhook delivered (attempt 3)" in messages
    finally:
        receiver.close()


def test_gives_up_after_max_attempts(
    tmp_path: Path, queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "MAX_ATTEMPTS", 3)
    receiver = Receiver([503] * 10)
    settings = Settings(data_dir=tmp_path, outbound_allow=LOOPBACK_OUTBOUND, webhook_retry_base_seconds=0.05)
    try:
        request_id = finish(queue, Webhook(url=receiver.url + "/hook", kind="bfl", secret="k"))
        asyncio.run(
            run_dispatcher_until(
                make_dispatcher(settings, queue),
                lambda: bool((d := queue.delivery(request_id)) and d.gave_up),
                20,
            )
        )
        delivery = queue.delivery(request_id)
        assert delivery is not None and delivery.gave_up and delivery.attempts == 3
        assert delivery.last_error == "HTTP 503" and delivery.delivered_at is None
        assert len(receiver.calls) == 3
        _, headers, body, _ = receiver.calls[0]
        assert verify_bfl_signature("k", body, headers.get("X-BFL-Signature"))
        record = queue.get(request_id)
        assert record is not None
        assert record.logs[-1].message == "Webhook delivery attempt 3 failed: HTTP 503; giving up"
    finally:
        receiver.close()


def test_a_kind_without_a_renderer_fails_the_attempt_instead_of_holding_the_row(
    tmp_path: Path, queue: JobQueue
) -> None:
    receiver = Receiver([])
    settings = Settings(data_dir=tmp_path, outbound_allow=LOOPBACK_OUTBOUND, webhook_retry_base_seconds=60)
    try:
        request_id = finish(queue, Webhook(url=receiver.url + "/hook", kind="bfl"))
        only_fal = dispatch.WebhookDispatcher(
            settings, queue, {"fal": fal_webhook.webhook_renderer(settings)}
        )
        asyncio.run(
            run_dispatcher_until(only_fal, lambda: bool((d := queue.delivery(request_id)) and d.attempts), 20)
        )
        delivery = queue.delivery(request_id)
        assert delivery.last_error == "no renderer for bfl webhooks" and receiver.calls == []
    finally:
        receiver.close()


def test_a_hanging_receiver_does_not_block_other_deliveries(
    tmp_path: Path, queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dispatch, "TOTAL_TIMEOUT_SECONDS", 1.0)
    receiver = Receiver([], hang_paths=("/slow",))
    settings = Settings(data_dir=tmp_path, outbound_allow=LOOPBACK_OUTBOUND, webhook_retry_base_seconds=60)
    try:
        slow_id = finish(queue, Webhook(url=receiver.url + "/slow", kind="fal"))
        fast_id = finish(queue, Webhook(url=receiver.url + "/fast", kind="fal"))
        started = time.monotonic()
        fast_done: list[float] = []

        def done() -> bool:
            fast = queue.delivery(fast_id)
            if fast and fast.delivered_at and not fast_done:
                fast_done.append(time.monotonic() - started)
            slow = queue.delivery(slow_id)
            return bool(fast_done and slow and slow.attempts == 1)

        asyncio.run(run_dispatcher_until(make_dispatcher(settings, queue), done, timeout=15))
        slow = queue.delivery(slow_id)
        assert fast_done and fast_done[0] < 1.0  # not queued behind the hanging one
        assert slow is not None and slow.last_error == "timed out" and slow.delivered_at is None
        assert not slow.gave_up and slow.due_at > time.time() + 30  # retried later, not dropped
    finally:
        receiver.close()


def test_a_receiver_answering_forever_is_not_read(tmp_path: Path, queue: JobQueue) -> None:
    """The status line decides; the body is never read, so a receiver streaming gigabytes
    costs the dispatcher nothing: the attempt ends at once and the connection is dropped."""
    receiver = Receiver([], endless_paths=("/endless",))
    settings = Settings(data_dir=tmp_path, outbound_allow=LOOPBACK_OUTBOUND, webhook_retry_base_seconds=60)
    try:
        request_id = finish(queue, Webhook(url=receiver.url + "/endless", kind="fal"))
        started = time.monotonic()

        def delivered() -> bool:
            delivery = queue.delivery(request_id)
            return delivery is not None and delivery.delivered_at is not None

        asyncio.run(run_dispatcher_until(make_dispatcher(settings, queue), delivered, timeout=10))
        assert time.monotonic() - started < dispatch.TOTAL_TIMEOUT_SECONDS
        assert receiver.hung_up.wait(5) and receiver.sent < 64 * 1024 * 1024
    finally:
        receiver.close()


def test_a_loopback_receiver_is_refused_by_default(tmp_path: Path, queue: JobQueue) -> None:
    """A name only DNS can judge passes at submit; each attempt resolves it and refuses a
    closed address before connecting (here `localhost`, stored as a queue would have it)."""
    receiver = Receiver([])
    settings = Settings(data_dir=tmp_path, outbound_allow=[], webhook_retry_base_seconds=60)
    try:
        port = receiver.url.rsplit(":", 1)[1]
        ids = [
            finish(queue, Webhook(url=f"{receiver.url}/hook", kind="fal")),
            finish(queue, Webhook(url=f"http://localhost:{port}/hook", kind="bfl")),
        ]

        def attempted() -> bool:
            return all((d := queue.delivery(i)) is not None and d.attempts == 1 for i in ids)

        asyncio.run(run_dispatcher_until(make_dispatcher(settings, queue), attempted, timeout=10))
        errors = [queue.delivery(i).last_error for i in ids]  # type: ignore[union-attr]
        assert "loopback address" in errors[0] and "loopback name" in errors[1], errors
        assert receiver.calls == []
    finally:
        receiver.close()


def test_the_post_goes_to_the_checked_address_with_the_original_host(
    tmp_path: Path, queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No DNS rebinding: `hooks.test` exists in no DNS; the policy resolves it once (here to
    the receiver's address, opened), and the POST goes to that address with Host hooks.test."""
    from server import fetch

    receiver = Receiver([])
    port = receiver.url.rsplit(":", 1)[1]
    lookups: list[str] = []

    async def resolve(host: str, _port: int) -> list:
        lookups.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(fetch, "resolve", resolve)
    settings = Settings(data_dir=tmp_path, outbound_allow=["127.0.0.1"], webhook_retry_base_seconds=60)
    try:
        request_id = finish(queue, Webhook(url=f"http://hooks.test:{port}/hook", kind="fal"))

        def delivered() -> bool:
            delivery = queue.delivery(request_id)
            return delivery is not None and delivery.delivered_at is not None

        asyncio.run(run_dispatcher_until(make_dispatcher(settings, queue), delivered, timeout=10))
        assert lookups == ["hooks.test"]
        assert [(path, headers["Host"]) for path, headers, _, _ in receiver.calls] == [
            ("/hook", f"hooks.test:{port}")
        ]
    finally:
        receiver.close()
