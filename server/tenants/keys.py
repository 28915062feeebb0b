"""The keys file: named API keys with roles, quotas and weights, stored as hashes only.

Two formats are read:

- JSON (written by `flux-server keys add|revoke`)::

    {"keys": [{"name": "team-a", "role": "user", "sha256": "<hex>", "weight": 1.0,
               "quotas": {"queued": 100, "per_minute": 60, "images_per_day": 5000},
               "created": "2026-12-07T13:00:00Z", "revoked": false}]}

  A key's token is shown once by `keys add` and never stored: only sha256(token). A token
  has 256 random bits, so a plain hash is as strong as a slow one and costs a microsecond
  per request.
- Legacy: one key per line (`#` starts a comment). Those keys, like `--api-key`, act as one
  unnamed admin (tenant None).

`KeyRing` answers "which caller is this token?"; `KeysWatcher` keeps a ring current with
the file (re-read when its mtime, size or inode change, looked at no more than once per
second), so a revoked key is refused within seconds without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.config import Settings
from server.tenants.caller import Caller, Quotas, Role

log = logging.getLogger("flux_server.keys")

TOKEN_PREFIX = "flux_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RECHECK_SECONDS = 1.0  # how often a watcher looks at the file's mtime at most


class KeysFileError(ValueError):
    """The keys file cannot be parsed (the message names the entry, never a key)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh API key: a recognisable prefix (secret scanners, logs review) + 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise KeysFileError(
            f"key name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class KeyEntry:
    name: str
    role: Role
    sha256: str
    weight: float = 1.0
    quotas: Quotas = field(default_factory=Quotas)
    created: str = ""
    revoked: bool = False

    def caller(self) -> Caller:
        return Caller(tenant=self.name, role=self.role, quotas=self.quotas, weight=self.weight)

    def to_json(self) -> dict[str, Any]:
        quotas = {
            name: value
            for name, value in (
                ("queued", self.quotas.queued),
                ("per_minute", self.quotas.per_minute),
                ("images_per_day", self.quotas.images_per_day),
            )
            if value is not None
        }
        return {
            "name": self.name,
            "role": self.role.value,
            "sha256": self.sha256,
            "weight": self.weight,
            "quotas": quotas,
            "created": self.created,
            "revoked": self.revoked,
        }

    @classmethod
    def from_json(cls, item: object, index: int) -> KeyEntry:
        where = f"keys[{index}]"
        if not isinstance(item, dict):
            raise KeysFileError(f"{where}: an object is expected")
        try:
            name = check_name(str(item["name"]))
            role = Role(item.get("role", Role.USER.value))
            digest = str(item["sha256"]).lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise KeysFileError(f"{where} ({name}): sha256 must be 64 hex digits")
            weight = float(item.get("weight", 1.0))
            if not weight > 0:
                raise KeysFileError(f"{where} ({name}): weight must be above 0")
            raw_quotas = item.get("quotas") or {}
            if not isinstance(raw_quotas, dict):
                raise KeysFileError(f"{where} ({name}): quotas must be an object")
            quotas = Quotas(
                **{k: _limit(raw_quotas.get(k), f"{where} ({name}).quotas.{k}") for k in QUOTA_NAMES}
            )
            return cls(
                name=name,
                role=role,
                sha256=digest,
                weight=weight,
                quotas=quotas,
                created=str(item.get("created", "")),
                revoked=bool(item.get("revoked", False)),
            )
        except KeyError as exc:
            raise KeysFileError(f"{where}: {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, KeysFileError):
                raise
            raise KeysFileError(f"{where}: {exc}") from None


QUOTA_NAMES = ("queued", "per_minute", "images_per_day")


def _limit(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise KeysFileError(f"{where}: a whole number of at least 0 (or null: unlimited) is expected")
    return value


@dataclass(frozen=True)
class KeysFile:
    """The file's content: named entries (JSON format) or unnamed legacy keys (plain lines)."""

    entries: tuple[KeyEntry, ...] = ()
    legacy: frozenset[str] = frozenset()
    is_json: bool = True

    def named(self, name: str) -> KeyEntry | None:
        return next((entry for entry in self.entries if entry.name == name), None)

    def with_entry(self, entry: KeyEntry) -> KeysFile:
        if self.named(entry.name) is not None:
            raise KeysFileError(
                f"a key named {entry.name!r} exists already (revoke it, or choose another name)"
            )
        return replace(self, entries=(*self.entries, entry))

    def revoked(self, name: str) -> KeysFile:
        if self.named(name) is None:
            raise KeysFileError(f"no key named {name!r}")
        return replace(
            self,
            entries=tuple(replace(e, revoked=True) if e.name == name else e for e in self.entries),
        )

    def to_text(self) -> str:
        return json.dumps({"keys": [entry.to_json() for entry in self.entries]}, indent=2) + "\n"


def parse(text: str) -> KeysFile:
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # The message quotes no content: only where the syntax broke.
            raise KeysFileError(f"not valid JSON (line {exc.lineno}, column {exc.colno})") from None
        items = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise KeysFileError('a JSON keys file is {"keys": [...]}')
        entries = tuple(KeyEntry.from_json(item, index) for index, item in enumerate(items))
        names = [entry.name for entry in entries]
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate is not None:
            raise KeysFileError(f"the name {duplicate!r} is given twice")
        return KeysFile(entries=entries)
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return KeysFile(legacy=frozenset(line for line in lines if line), is_json=False)


def load(path: Path) -> KeysFile:
    return parse(Path(path).read_text())


def save(path: Path, keys: KeysFile) -> None:
    """Write atomically (a temporary file in the same directory, then a rename), readable by
    its owner only: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(keys.to_text())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --- resolving tokens ------------------------------------------------------------------------

ADMIN = Caller(tenant=None, role=Role.ADMIN)  # `--api-key` and legacy keys: one unnamed admin


@dataclass(frozen=True)
class KeyRing:
    """The keys in force: `--api-key` values and legacy lines (unnamed admins) and the named,
    unrevoked entries of a JSON keys file, by hash. `enabled` is False only when no key is
    configured at all (auth off); a JSON file whose keys are all revoked keeps auth on."""

    unnamed: frozenset[str] = frozenset()
    by_hash: dict[str, Caller] = field(default_factory=dict)  # unrevoked named keys' callers
    entries: tuple[KeyEntry, ...] = ()  # every named entry, revoked ones included
    has_file: bool = False

    @classmethod
    def build(cls, api_keys: Iterable[str], keys: KeysFile | None) -> KeyRing:
        unnamed = set(api_keys)
        entries: tuple[KeyEntry, ...] = ()
        if keys is not None:
            unnamed |= keys.legacy
            entries = keys.entries
        by_hash = {entry.sha256: entry.caller() for entry in entries if not entry.revoked}
        return cls(
            unnamed=frozenset(unnamed),
            by_hash=by_hash,
            entries=entries,
            has_file=keys is not None and keys.is_json,
        )

    @property
    def count(self) -> int:
        """Keys accepted now (unnamed and unrevoked named ones)."""
        return len(self.unnamed) + len(self.by_hash)

    @property
    def enabled(self) -> bool:
        return bool(self.unnamed) or self.has_file

    def resolve(self, token: str | None) -> Caller | None:
        """The caller `token` acts as, or None (missing, unknown or revoked)."""
        if token is None:
            return None
        # Unnamed keys are compared whole, every one without stopping early (timing reveals
        # nothing); named ones by their hash (a lookup reveals only the hash's bytes).
        matched = False
        for candidate in self.unnamed:
            matched |= hmac.compare_digest(candidate.encode(), token.encode())
        if matched:
            return ADMIN
        return self.by_hash.get(hash_token(token))

    def queued_tenants(self) -> list[str | None]:
        """The tenants whose keys have a `queued` quota."""
        return [caller.tenant for caller in self.by_hash.values() if caller.quotas.queued is not None]

    def weights(self) -> dict[str, float]:
        """Fair-share weights of the named tenants (revoked ones too: their jobs still run)."""
        return {entry.name: entry.weight for entry in self.entries}


def ring_of(settings: Settings) -> KeyRing:
    """The keys in force now (--api-key and the keys file, read afresh; KeysFileError or
    OSError for an unreadable file)."""
    path = settings.keys_path
    keys = load(path) if settings.api_keys_file is not None or path.is_file() else None
    return KeyRing.build(settings.api_key, keys)


def auth_enabled(settings: Settings) -> bool:
    return ring_of(settings).enabled


def watcher_of(settings: Settings) -> KeysWatcher:
    """A watcher on the settings' keys. A broken keys file, or a missing --api-keys-file,
    fails here, at start-up: never a server that starts with fewer keys (or none: auth off)."""
    if settings.api_keys_file is not None and not Path(settings.api_keys_file).is_file():
        raise FileNotFoundError(f"--api-keys-file {settings.api_keys_file}: no such file")
    return KeysWatcher(settings.keys_path, settings.api_key, required=True)


class KeysWatcher:
    """A `KeyRing` kept current with the keys file. `ring()` is called per request: it
    stats the file at most once per `recheck` seconds and re-reads it when it changed. A file
    that becomes unreadable or invalid keeps the last good ring (logged); one that disappears
    revokes its keys but keeps auth on (only `--api-key` keys are accepted): deleting the file
    never opens the server."""

    def __init__(
        self,
        path: Path | None,
        api_keys: Iterable[str] = (),
        *,
        recheck: float = RECHECK_SECONDS,
        required: bool = False,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.api_keys = tuple(api_keys)
        self.recheck = recheck
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._ring = KeyRing.build(self.api_keys, None)
        self._listeners: list[Callable[[KeyRing], None]] = []
        self._refresh(raise_errors=required)

    def on_change(self, listener: Callable[[KeyRing], None]) -> None:
        """Call `listener(ring)` now and after every reload (fair-share weights follow)."""
        self._listeners.append(listener)
        listener(self._ring)

    def ring(self) -> KeyRing:
        now = time.monotonic()
        if now - self._checked_at >= self.recheck:
            with self._lock:
                if now - self._checked_at >= self.recheck:
                    self._refresh(raise_errors=False)
        return self._ring

    def _refresh(self, *, raise_errors: bool) -> None:
        self._checked_at = time.monotonic()
        if self.path is None:
            return
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            if self._signature is not None:
                log.warning("keys file %s disappeared: its keys are refused, auth stays on", self.path)
                self._signature = None
                self._set(KeyRing.build(self.api_keys, KeysFile()))
            return
        signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if signature == self._signature:
            return
        try:
            keys = load(self.path)
        except (OSError, KeysFileError) as exc:
            if raise_errors:
                raise
            log.error("keys file %s not reloaded, the previous keys stay in force: %s", self.path, exc)
            self._signature = signature  # not re-read every second until it changes again
            return
        self._signature = signature
        self._set(KeyRing.build(self.api_keys, keys))

    def _set(self, ring: KeyRing) -> None:
        self._ring = ring
        for listener in self._listeners:
            try:
                listener(ring)
            except Exception:
                log.exception("keys reload listener failed")
