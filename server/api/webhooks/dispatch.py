"""Webhook delivery, retried until it lands.

How a delivery travels:
1. A job with `job.webhook` completes; the queue writes its delivery row in the same
   transaction and wakes the API processes.
2. `WebhookDispatcher.run()` (a background task of each API process) leases due rows
   (`JobQueue.lease_deliveries`: pushing their `due_at` forward, so no other dispatcher, on
   this box or another, sends one while an attempt is alive; a crash mid-send only delays it),
   renders the body with the renderer of the webhook's protocol and POSTs it.
3. Success (2xx) sets `delivered_at`; anything else (non-2xx, timeout, refused connection) sets
   the next `due_at` from `retry_delay` until `MAX_ATTEMPTS` have failed (`gave_up`). Each
   attempt adds a line to the request's logs, so clients see it in the status logs.

Each attempt goes through the outbound policy (server/fetch.py): the receiver's name is
resolved and checked, and the POST goes to that checked address (no DNS rebinding). The whole
attempt (lookup, connection, upload, the answer's status line) has one deadline, and the
receiver's response body is never read: only its status counts.

All state lives in the queue: a restart picks up where it stopped. The payloads belong to the
protocols: the composition root (server/api/app.py) hands in one renderer per webhook kind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import httpx

from server import metrics
from server.api.webhooks.policy import validate_webhook_url
from server.config import Settings
from server.fetch import FetchPolicy, pinned_client
from server.jobs import JobRecord
from server.queue.base import Delivery, JobQueue

logger = logging.getLogger(__name__)

# Renders one attempt: the body and the protocol's headers (signatures); for `Webhook.kind`.
WebhookRenderer = Callable[[JobRecord], tuple[bytes, dict[str, str]]]

MAX_ATTEMPTS = 10
# Delays after failed attempts 1..9 with the default 15 s base: 15 s, 30 s, 1, 2, 4, 8, 16, 32
# and 60 min (the cap): about 2 hours from the first attempt to the tenth, like fal's.
DEFAULT_RETRY_BASE_SECONDS = 15.0
MAX_DELAY_FACTOR = 240  # cap = 240 x base (60 min with the default base)
REQUEST_TIMEOUT_SECONDS = 10.0  # connect, read and write each
TOTAL_TIMEOUT_SECONDS = 15.0  # the whole attempt: a receiver trickling bytes cannot hold a slot longer
MAX_CONCURRENT_DELIVERIES = 16
# A leased row comes due again after this if its dispatcher died mid-send.
LEASE_SECONDS = TOTAL_TIMEOUT_SECONDS + 30.0
IDLE_RECHECK_SECONDS = 2.0  # re-read the table at least this often (lost wake-ups)
USER_AGENT = "flux-server-webhooks/1"


def retry_delay(failed_attempts: int, base: float = DEFAULT_RETRY_BASE_SECONDS) -> float:
    """Seconds to wait after `failed_attempts` failures (1 -> base, doubling, capped)."""
    return base * min(2 ** (failed_attempts - 1), MAX_DELAY_FACTOR)


def _format_delay(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


class WebhookDispatcher:
    def __init__(self, settings: Settings, queue: JobQueue, renderers: Mapping[str, WebhookRenderer]) -> None:
        self.settings = settings
        self.queue = queue
        self.renderers = dict(renderers)
        self.base_delay = settings.webhook_retry_base_seconds
        self.fetch_policy = FetchPolicy.from_settings(settings)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Deliver until cancelled (the API's lifespan cancels it at shutdown)."""
        async with pinned_client(REQUEST_TIMEOUT_SECONDS) as client:
            try:
                while True:
                    try:
                        await self.dispatch_due(client)
                        await self._sleep_until_due()
                    except Exception:  # a broken row or an unreachable queue must not stop delivery
                        logger.exception("webhook dispatch failed; retrying")
                        await asyncio.sleep(IDLE_RECHECK_SECONDS)
            finally:
                for task in list(self._in_flight):
                    task.cancel()
                await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _sleep_until_due(self) -> None:
        next_due = await asyncio.to_thread(self.queue.next_delivery_due)
        wait = IDLE_RECHECK_SECONDS
        if next_due is not None:
            wait = min(wait, max(0.0, next_due - time.time()))
        if wait <= 0:
            await asyncio.sleep(0.01)  # due now but every slot is busy: yield, then look again
            return
        await self.queue.wait_for_deliveries(wait)

    async def dispatch_due(self, client: httpx.AsyncClient) -> int:
        """Start a task for every due row that a free slot can take; return how many started."""
        free = MAX_CONCURRENT_DELIVERIES - len(self._in_flight)
        if free <= 0:
            return 0
        now = time.time()
        leased = await asyncio.to_thread(self.queue.lease_deliveries, now, free, now + LEASE_SECONDS)
        for delivery in leased:
            task = asyncio.create_task(self._deliver(client, delivery))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        return len(leased)

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        async with self._slots:
            attempt = delivery.attempts + 1
            record = await asyncio.to_thread(self.queue.get, delivery.request_id, with_logs=False)
            if record is None or record.job.webhook is None:
                await asyncio.to_thread(
                    self.queue.delivery_failed,
                    delivery.request_id,
                    attempt,
                    "the request no longer exists",
                    None,
                )
                return
            error = await self._attempt(client, record)
            now = time.time()
            if error is None:
                await asyncio.to_thread(self.queue.delivery_succeeded, record.id, attempt, now)
                metrics.webhook_deliveries_total.labels("delivered").inc()
                message = f"Webhook delivered (attempt {attempt})"
            elif attempt >= MAX_ATTEMPTS:
                await asyncio.to_thread(self.queue.delivery_failed, record.id, attempt, error, None)
                metrics.webhook_deliveries_total.labels("gave_up").inc()
                message = f"Webhook delivery attempt {attempt} failed: {error}; giving up"
            else:
                delay = retry_delay(attempt, self.base_delay)
                await asyncio.to_thread(self.queue.delivery_failed, record.id, attempt, error, now + delay)
                metrics.webhook_deliveries_total.labels("retry").inc()
                message = (
                    f"Webhook delivery attempt {attempt} failed: {error}; retrying in {_format_delay(delay)}"
                )
            logger.info("%s: %s", record.id, message)
            await asyncio.to_thread(self.queue.log, record.id, message)

    async def _attempt(self, client: httpx.AsyncClient, record: JobRecord) -> str | None:
        """POST once; None on success, else a short reason."""
        webhook = record.job.webhook
        assert webhook is not None
        try:
            validate_webhook_url(webhook.url, self.settings)  # the allow-list may have changed
        except ValueError as exc:
            return str(exc)
        renderer = self.renderers.get(webhook.kind)
        if renderer is None:
            return f"no renderer for {webhook.kind} webhooks"
        try:
            body, protocol_headers = await asyncio.to_thread(renderer, record)
        except Exception as exc:  # a bug here must not leave the row held forever
            logger.exception("rendering the webhook of %s failed", record.id)
            return f"could not render the payload: {exc!r}"
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **protocol_headers}
        try:
            status = await asyncio.wait_for(
                self._post(client, webhook.url, body, headers), TOTAL_TIMEOUT_SECONDS
            )
        except ValueError as exc:  # FetchRefused: the name resolves to a closed address now
            return str(exc)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return "timed out"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    async def _post(self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]) -> int:
        """POST to the checked address of `url`; the status code. The response body is not
        read (a receiver may send gigabytes): the connection closes with it unread."""
        target = await self.fetch_policy.target(url)
        request = target.request(client, "POST", content=body, headers=headers)
        response = await client.send(request, stream=True)
        await response.aclose()
        return response.status_code


def start_dispatcher(
    settings: Settings, queue: JobQueue, renderers: Mapping[str, WebhookRenderer]
) -> Callable[[], Awaitable[None]]:
    """A coroutine factory for `app.state.background` (the app starts and cancels it)."""

    async def dispatcher() -> None:
        await WebhookDispatcher(settings, queue, renderers).run()

    return dispatcher
