"""Webhook delivery: fal (Ed25519-signed) and BFL (HMAC-signed), retried until it lands.

How a delivery travels:
1. A job with `job.webhook` completes; the queue inserts a `deliveries` row in the same
   transaction and wakes the API process (server/queue/sqlite.py).
2. `WebhookDispatcher.run()` (a background task of the API process) reads due rows, takes each
   by pushing its `due_at` forward (so no other dispatcher sends it twice, and a crash mid-send
   only delays it), renders the body from the `JobRecord` and POSTs it.
3. Success (2xx) sets `delivered_at`; anything else (non-2xx, timeout, refused connection) sets
   the next `due_at` from `retry_delay` until `MAX_ATTEMPTS` have failed (`gave_up`). Each
   attempt adds a line to the request's logs, so clients see it in the status logs.

All state lives in the table: a restart picks up where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.config import Settings
from server.jobs import JobRecord
from server.keys import load_or_create_private_key
from server.protocols.bfl.adapter import webhook_payload as bfl_webhook_payload
from server.queue.base import JobQueue

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
# Delays after failed attempts 1..9 with the default 15 s base: 15 s, 30 s, 1, 2, 4, 8, 16, 32
# and 60 min (the cap): about 2 hours from the first attempt to the tenth, like fal's.
DEFAULT_RETRY_BASE_SECONDS = 15.0
MAX_DELAY_FACTOR = 240  # cap = 240 x base (60 min with the default base)
REQUEST_TIMEOUT_SECONDS = 10.0  # connect, read and write each
TOTAL_TIMEOUT_SECONDS = 15.0  # a receiver trickling bytes cannot hold a slot longer
MAX_CONCURRENT_DELIVERIES = 16
# A taken row comes due again after this if its dispatcher died mid-send.
CLAIM_HOLD_SECONDS = TOTAL_TIMEOUT_SECONDS + 30.0
IDLE_RECHECK_SECONDS = 2.0  # re-read the table at least this often (lost wake-ups)
SIGNATURE_TOLERANCE_SECONDS = 300
USER_AGENT = "flux-server-webhooks/1"


# --- policy --------------------------------------------------------------------------------
def retry_delay(failed_attempts: int, base: float = DEFAULT_RETRY_BASE_SECONDS) -> float:
    """Seconds to wait after `failed_attempts` failures (1 -> base, doubling, capped)."""
    return base * min(2 ** (failed_attempts - 1), MAX_DELAY_FACTOR)


def _host_allowed(host: str, allowlist: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowlist:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*.") and host.endswith(entry[1:]):
            return True
        if host == entry:
            return True
    return False


def validate_webhook_url(url: str, settings: Settings) -> str:
    """Check a webhook URL at submit time; raises ValueError with a message for the client.

    http(s) only; with `settings.webhook_allowlist` non-empty the host must be listed (exact
    name, or `*.example.com` for its subdomains).
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError as exc:
        raise ValueError(f"invalid webhook URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("webhook URL must be an absolute http:// or https:// URL")
    if len(url) > 2083:
        raise ValueError("webhook URL is longer than 2083 characters")
    if settings.webhook_allowlist and not _host_allowed(host, settings.webhook_allowlist):
        raise ValueError(f"webhook host {host!r} is not on this server's webhook allow-list")
    return url.strip()


# --- signatures ----------------------------------------------------------------------------
def fal_signature_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    return "\n".join([request_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()


def fal_signature_headers(
    body: bytes, *, request_id: str, user_id: str, key: Ed25519PrivateKey, timestamp: int | None = None
) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = key.sign(fal_signature_message(request_id, user_id, ts, body))
    return {
        "X-Fal-Webhook-Request-Id": request_id,
        "X-Fal-Webhook-User-Id": user_id,
        "X-Fal-Webhook-Timestamp": ts,
        "X-Fal-Webhook-Signature": signature.hex(),
    }


def verify_fal_signature(
    headers: Mapping[str, str], body: bytes, public_keys: list[Ed25519PublicKey], now: float | None = None
) -> bool:
    """What a receiver does (fal's documented steps): fresh timestamp, then any key verifies."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        request_id = lowered["x-fal-webhook-request-id"]
        user_id = lowered["x-fal-webhook-user-id"]
        timestamp = lowered["x-fal-webhook-timestamp"]
        signature = bytes.fromhex(lowered["x-fal-webhook-signature"])
        age = abs((time.time() if now is None else now) - int(timestamp))
    except (KeyError, ValueError):
        return False
    if age > SIGNATURE_TOLERANCE_SECONDS:
        return False
    message = fal_signature_message(request_id, user_id, timestamp, body)
    for key in public_keys:
        with contextlib.suppress(InvalidSignature):
            key.verify(signature, message)
            return True
    return False


def bfl_signature(secret: str, body: bytes) -> str:
    """The `X-BFL-Signature` header value."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_bfl_signature(secret: str, body: bytes, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(bfl_signature(secret, body), header)


# --- payloads ------------------------------------------------------------------------------
def fal_webhook_payload(record: JobRecord) -> dict[str, Any]:
    """fal's webhook body; `payload` is exactly what the result route would answer."""
    from server.protocols.fal.adapter import error_parts, output_body

    body: dict[str, Any] = {
        "request_id": record.id,
        "gateway_request_id": record.id,
        "status": "OK",
        "payload": None,
        "error": None,
        "payload_error": None,
    }
    if record.result is not None:
        body["payload"] = output_body(record.result, record.job.base_url)
    elif record.error is not None:
        status_code, error_body, _ = error_parts(record.error)
        body["status"] = "ERROR"
        body["error"] = f"Invalid status code: {status_code}"
        body["payload"] = error_body
    return body


def render_delivery(record: JobRecord, settings: Settings) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one delivery attempt (signed afresh: the timestamp is now)."""
    webhook = record.job.webhook
    assert webhook is not None
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if webhook.kind == "fal":
        body = json.dumps(fal_webhook_payload(record)).encode()
        key = load_or_create_private_key(settings.data_dir)
        headers |= fal_signature_headers(
            body, request_id=record.id, user_id=settings.webhook_user_id, key=key
        )
    else:
        body = json.dumps(bfl_webhook_payload(record)).encode()
        if webhook.secret:
            headers["X-BFL-Signature"] = bfl_signature(webhook.secret, body)
    return body, headers


# --- the deliveries table ------------------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    request_id: str
    due_at: float
    attempts: int
    last_error: str | None = None
    delivered_at: float | None = None
    gave_up: bool = False


class DeliveryStore:
    """The `deliveries` table (created by the queue), through a connection of our own.

    sqlite3 connections belong to the thread that made them, so the connection lives on one
    dedicated thread and every statement runs there; callers may use any thread.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook-deliveries")
        self._conn = self._thread.submit(connect).result()

    def _run(self, sql: str, params: tuple = ()) -> tuple[list[tuple], int]:
        def execute() -> tuple[list[tuple], int]:
            cursor = self._conn.execute(sql, params)
            return cursor.fetchall(), cursor.rowcount

        return self._thread.submit(execute).result()

    def due(self, now: float, limit: int) -> list[Delivery]:
        rows, _ = self._run(
            "SELECT request_id, due_at, attempts FROM deliveries WHERE delivered_at IS NULL "
            "AND gave_up = 0 AND due_at <= ? ORDER BY due_at LIMIT ?",
            (now, limit),
        )
        return [Delivery(*row) for row in rows]

    def next_due_at(self) -> float | None:
        rows, _ = self._run("SELECT MIN(due_at) FROM deliveries WHERE delivered_at IS NULL AND gave_up = 0")
        return rows[0][0] if rows else None

    def take(self, delivery: Delivery, hold_until: float) -> bool:
        """Claim a due row; False if someone else took it first."""
        _, changed = self._run(
            "UPDATE deliveries SET due_at = ? WHERE request_id = ? AND due_at = ? AND delivered_at IS NULL",
            (hold_until, delivery.request_id, delivery.due_at),
        )
        return changed == 1

    def succeeded(self, request_id: str, attempts: int, now: float) -> None:
        self._run(
            "UPDATE deliveries SET attempts = ?, delivered_at = ?, last_error = NULL WHERE request_id = ?",
            (attempts, now, request_id),
        )

    def failed(self, request_id: str, attempts: int, error: str, next_due_at: float | None) -> None:
        """Record a failed attempt; `next_due_at=None` means give up."""
        self._run(
            "UPDATE deliveries SET attempts = ?, last_error = ?, due_at = COALESCE(?, due_at), "
            "gave_up = ? WHERE request_id = ?",
            (attempts, error, next_due_at, int(next_due_at is None), request_id),
        )

    def get(self, request_id: str) -> Delivery | None:
        rows, _ = self._run(
            "SELECT request_id, due_at, attempts, last_error, delivered_at, gave_up FROM deliveries "
            "WHERE request_id = ?",
            (request_id,),
        )
        return Delivery(*rows[0][:5], gave_up=bool(rows[0][5])) if rows else None

    def close(self) -> None:
        self._thread.submit(self._conn.close).result()
        self._thread.shutdown()


# --- the dispatcher ------------------------------------------------------------------------
def _format_delay(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


class WebhookDispatcher:
    def __init__(self, settings: Settings, queue: JobQueue, store: DeliveryStore | None = None) -> None:
        self.settings = settings
        self.queue = queue
        if store is None:
            connect = getattr(queue, "connect", None)
            if connect is None:
                raise TypeError(f"{type(queue).__name__} keeps no deliveries table")
            store = DeliveryStore(connect)
        self.store = store
        self.base_delay = settings.webhook_retry_base_seconds
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        self._in_flight: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Deliver until cancelled (the API's lifespan cancels it at shutdown)."""
        timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            try:
                while True:
                    try:
                        await self.dispatch_due(client)
                    except Exception:  # a broken row or a locked database must not stop delivery
                        logger.exception("webhook dispatch failed; retrying")
                    await self._sleep_until_due()
            finally:
                for task in list(self._in_flight):
                    task.cancel()
                await asyncio.gather(*self._in_flight, return_exceptions=True)
                self.store.close()

    async def _sleep_until_due(self) -> None:
        next_due = await asyncio.to_thread(self.store.next_due_at)
        wait = IDLE_RECHECK_SECONDS
        if next_due is not None:
            wait = min(wait, max(0.0, next_due - time.time()))
        if wait <= 0:
            await asyncio.sleep(0.01)  # due now but every slot is busy: yield, then look again
            return
        waiter = getattr(self.queue, "wait_for_deliveries", None)
        if waiter is not None:
            await waiter(wait)
        else:
            await asyncio.sleep(wait)

    async def dispatch_due(self, client: httpx.AsyncClient) -> int:
        """Start a task for every due row that a free slot can take; return how many started."""
        free = MAX_CONCURRENT_DELIVERIES - len(self._in_flight)
        if free <= 0:
            return 0
        now = time.time()
        started = 0
        for delivery in await asyncio.to_thread(self.store.due, now, free):
            if not await asyncio.to_thread(self.store.take, delivery, now + CLAIM_HOLD_SECONDS):
                continue
            task = asyncio.create_task(self._deliver(client, delivery))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            started += 1
        return started

    async def _deliver(self, client: httpx.AsyncClient, delivery: Delivery) -> None:
        async with self._slots:
            attempt = delivery.attempts + 1
            record = await asyncio.to_thread(self.queue.get, delivery.request_id)
            if record is None or record.job.webhook is None:
                await asyncio.to_thread(
                    self.store.failed, delivery.request_id, attempt, "the request no longer exists", None
                )
                return
            error = await self._attempt(client, record)
            now = time.time()
            if error is None:
                await asyncio.to_thread(self.store.succeeded, record.id, attempt, now)
                message = f"Webhook delivered (attempt {attempt})"
            elif attempt >= MAX_ATTEMPTS:
                await asyncio.to_thread(self.store.failed, record.id, attempt, error, None)
                message = f"Webhook delivery attempt {attempt} failed: {error}; giving up"
            else:
                delay = retry_delay(attempt, self.base_delay)
                await asyncio.to_thread(self.store.failed, record.id, attempt, error, now + delay)
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
        try:
            body, headers = await asyncio.to_thread(render_delivery, record, self.settings)
        except Exception as exc:  # a bug here must not leave the row held forever
            logger.exception("rendering the webhook of %s failed", record.id)
            return f"could not render the payload: {exc!r}"
        try:
            response = await asyncio.wait_for(
                client.post(webhook.url, content=body, headers=headers), TOTAL_TIMEOUT_SECONDS
            )
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return "timed out"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"


def start_dispatcher(settings: Settings, queue: JobQueue) -> Callable[[], Any]:
    """A coroutine factory for `app.state.background` (the app starts and cancels it)."""

    async def dispatcher() -> None:
        if not hasattr(queue, "connect"):
            logger.warning("%s keeps no deliveries table: webhooks are not sent", type(queue).__name__)
            return
        await WebhookDispatcher(settings, queue).run()

    return dispatcher
