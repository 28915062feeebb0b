"""Which webhook URLs a client may give, checked at submit time and again before each attempt."""

from __future__ import annotations

from urllib.parse import urlsplit

from server.config import Settings
from server.fetch import FetchPolicy

MAX_URL_LENGTH = 2083


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
    """Check a webhook URL; raises ValueError with a message for the client.

    http(s) only; with `settings.webhook_allowlist` non-empty the host must be listed (exact
    name, or `*.example.com` for its subdomains); and what the outbound policy refuses without
    a DNS lookup (server/fetch.py: a loopback or metadata name, a closed address literal, a
    denied name) is refused here, at submit. Names are resolved and checked at each attempt.
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError as exc:
        raise ValueError(f"invalid webhook URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError("webhook URL must be an absolute http:// or https:// URL")
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    if settings.webhook_allowlist and not _host_allowed(host, settings.webhook_allowlist):
        raise ValueError(f"webhook host {host!r} is not on this server's webhook allow-list")
    try:
        FetchPolicy.from_settings(settings).check_static(url.strip())
    except ValueError as exc:  # FetchRefused
        raise ValueError(f"webhook URL refused: {exc}") from None
    return url.strip()
