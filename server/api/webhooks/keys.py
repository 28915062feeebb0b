"""The server's Ed25519 key pair for signing fal webhooks, and its public JWKS.

The key is generated once, on first use, and kept in the data directory (mode 0600) so that a
receiver that pinned our JWKS keeps verifying after a restart. Creation is atomic (write a
temporary file, then hard-link it into place), so two processes starting together end up with
the same key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE_NAME = "webhook-ed25519.pem"

_cache: dict[Path, Ed25519PrivateKey] = {}
_cache_lock = threading.Lock()


def key_path(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_FILE_NAME


def load_or_create_private_key(data_dir: Path) -> Ed25519PrivateKey:
    """The signing key kept in `data_dir`, generated (0600) on first call."""
    path = key_path(data_dir).absolute()
    with _cache_lock:
        key = _cache.get(path)
        if key is None:
            key = _read_key(path) if path.exists() else _create_key(path)
            _cache[path] = key
        return key


def _read_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def _create_key(path: Path) -> Ed25519PrivateKey:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".key-")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(pem)
        try:
            os.link(tmp_name, path)  # fails if another process created the key first
        except FileExistsError:
            return _read_key(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return key


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """A stable id derived from the key itself (JWK thumbprint-like; no registry needed)."""
    return _b64url(hashlib.sha256(raw_public_bytes(public_key)).digest()[:16])


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url(raw_public_bytes(public_key)),
        "kid": key_id(public_key),
        "use": "sig",
        "alg": "EdDSA",
    }


def jwks(public_keys: list[Ed25519PublicKey]) -> dict[str, list[dict[str, str]]]:
    return {"keys": [public_jwk(key) for key in public_keys]}


def public_keys_from_jwks(document: dict) -> list[Ed25519PublicKey]:
    """The Ed25519 keys of a JWKS document (what a verifying receiver does with ours)."""
    keys = []
    for jwk in document.get("keys", []):
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and "x" in jwk:
            x = jwk["x"] + "=" * (-len(jwk["x"]) % 4)
            keys.append(Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x)))
    return keys
