"""Signed file URLs: `/files/<exp>.<sig>/<name>`, usable in a plain `<img src>`.

With authentication on, every file URL the server returns (generated images, uploads) carries
an expiry (unix time) and an HMAC-SHA256 of (name, expiry) under the server's URL-signing
key, and `GET /files/...` serves only such URLs, without an API key: the URL is the permission,
it cannot be altered to reach another file or to live longer, and it stops working when it
expires (the file's own expiry: an upload's lifecycle, or retention for an output). The
signature is a path segment, not a query: the URL still ends with the file's extension, and
fal_client's multipart upload, which appends `/multipart/...` to the URL it was given, works.

With authentication off (no key configured), URLs are plain, as before: every caller may
read every file anyway.

The key is `--url-signing-key` (FLUX_URL_SIGNING_KEY), else one generated once into
`<data_dir>/url-signing.key`. Boxes behind one address (a shared queue and files mount) must
share it, or a URL returned by one box is refused by another.

Which signer applies is a context variable (`current_signer`), set by the app for its
requests and its background tasks, so that every place that renders a URL (each protocol's
responses, webhooks) signs it without the signer being handed through each of them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path

KEY_FILE_NAME = "url-signing.key"
# `<expiry>.<43 characters of unpadded base64url HMAC-SHA256>`
SIGNATURE_SEGMENT = re.compile(r"[0-9]{1,12}\.[A-Za-z0-9_-]{43}")
ROUND_SECONDS = 3600  # output URLs' expiry rounded up to the hour: stable across status polls


class UrlSigner:
    def __init__(self, key: bytes, lifetime: float, active: Callable[[], bool] = lambda: True) -> None:
        self._key = key
        self.lifetime = lifetime  # an output URL's life from now (the retention time)
        self._active = active  # False: plain URLs, and /files serves without a signature

    @property
    def active(self) -> bool:
        return self._active()

    def signature(self, name: str, expires: int) -> str:
        digest = hmac.new(self._key, f"{name}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def segment(self, name: str, expires_at: float | None = None, now: float | None = None) -> str:
        """`<exp>.<sig>` for `name`, valid until `expires_at` (default: now + lifetime,
        rounded up to the hour)."""
        if expires_at is None:
            now = time.time() if now is None else now
            expires = math.ceil((now + self.lifetime) / ROUND_SECONDS) * ROUND_SECONDS
        else:
            expires = math.ceil(expires_at)
        return f"{expires}.{self.signature(name, expires)}"

    def verify(self, name: str, segment: str | None, now: float | None = None) -> str | None:
        """None when `segment` signs `name` and has not expired, else why not (for the 403)."""
        if segment is None:
            return "This file URL is not signed: use the URL the server returned"
        if not SIGNATURE_SEGMENT.fullmatch(segment):
            return "This file URL's signature is not valid"
        exp, _, sig = segment.partition(".")
        expires = int(exp)
        if not hmac.compare_digest(self.signature(name, expires), sig):
            return "This file URL's signature is not valid"
        if expires <= (time.time() if now is None else now):
            return "This file URL has expired"
        return None


current_signer: ContextVar[UrlSigner | None] = ContextVar("flux_url_signer", default=None)


def signature_segment(name: str, expires_at: float | None = None) -> str | None:
    """The path segment that signs a URL of `name` in the current context, or None (plain)."""
    signer = current_signer.get()
    if signer is None or not signer.active:
        return None
    return signer.segment(name, expires_at)


def load_signing_key(configured: str | None, data_dir: Path) -> bytes:
    """The configured key, else the data directory's, generated on first use (created
    exclusively: processes starting together agree on one key)."""
    if configured:
        return configured.encode()
    path = Path(data_dir) / KEY_FILE_NAME
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
    temporary.write_text(secrets.token_urlsafe(48) + "\n")
    os.chmod(temporary, 0o600)
    try:
        os.link(temporary, path)  # fails if another process made it first: then use theirs
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path} is empty: delete it (a new key is generated) or fill it")
    return key.encode()
