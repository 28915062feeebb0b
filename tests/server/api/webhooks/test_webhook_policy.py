"""Which webhook URLs a client may give."""

from __future__ import annotations

import pytest

from server.api.webhooks.policy import validate_webhook_url
from server.config import Settings


def test_allow_list_and_url_checks() -> None:
    open_settings = Settings(webhook_allowlist=[])
    assert validate_webhook_url("http://anything.example:9000/hook", open_settings)
    for bad in ("ftp://example.com/x", "example.com/hook", "http:///nohost"):
        with pytest.raises(ValueError):
            validate_webhook_url(bad, open_settings)

    listed = Settings(webhook_allowlist="hooks.example.com, *.internal.test")
    assert validate_webhook_url("https://hooks.example.com/a", listed)
    assert validate_webhook_url("https://HOOKS.example.com./a", listed)
    assert validate_webhook_url("https://ci.internal.test/a", listed)
    for refused in ("https://evil.example.com/a", "https://internal.test.evil.com/a", "http://127.0.0.1/a"):
        with pytest.raises(ValueError, match="allow-list"):
            validate_webhook_url(refused, listed)
