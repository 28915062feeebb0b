"""The server's Ed25519 webhook key: made once with mode 0600, served as JWKS."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

from server.api.webhooks import keys


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
