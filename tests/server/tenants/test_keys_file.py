"""The keys file: formats, hashes only, atomic writes, and a watcher that follows changes."""

from __future__ import annotations

import json
import os
import time

import pytest

from server.tenants import Quotas, Role
from server.tenants.keys import (
    ADMIN,
    KeyEntry,
    KeyRing,
    KeysFile,
    KeysFileError,
    KeysWatcher,
    hash_token,
    load,
    new_token,
    parse,
    save,
)


def entry(name: str, token: str, **values) -> KeyEntry:
    return KeyEntry(name=name, role=values.pop("role", Role.USER), sha256=hash_token(token), **values)


def test_a_saved_file_holds_hashes_only_and_reads_back(tmp_path):
    token = new_token()
    keys = KeysFile().with_entry(
        entry("team-a", token, weight=2.0, quotas=Quotas(queued=3, per_minute=None, images_per_day=10))
    )
    path = tmp_path / "keys.json"
    save(path, keys)
    text = path.read_text()
    assert token not in text and hash_token(token) in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load(path) == keys
    assert json.loads(text)["keys"][0]["quotas"] == {"queued": 3, "images_per_day": 10}
    assert not [p for p in tmp_path.iterdir() if p.name != "keys.json"]  # no temporary left


def test_tokens_are_random_and_prefixed():
    first, second = new_token(), new_token()
    assert first != second and first.startswith("flux_") and len(first) > 40


def test_a_named_key_resolves_to_its_caller_and_a_revoked_one_to_none():
    token = new_token()
    keys = KeysFile().with_entry(entry("team-a", token, weight=3.0, quotas=Quotas(queued=5)))
    caller = KeyRing.build([], keys).resolve(token)
    assert caller is not None
    assert (caller.tenant, caller.role, caller.weight, caller.quotas.queued) == ("team-a", Role.USER, 3.0, 5)
    ring = KeyRing.build([], keys.revoked("team-a"))
    assert ring.resolve(token) is None
    assert ring.enabled  # every key revoked: auth stays on, nothing is accepted
    assert ring.weights() == {"team-a": 3.0}


def test_legacy_lines_and_api_keys_act_as_one_unnamed_admin():
    keys = parse("# comment\nplain-one\n  plain-two  # trailing\n\n")
    assert not keys.is_json
    ring = KeyRing.build(["from-flag"], keys)
    for token in ("plain-one", "plain-two", "from-flag"):
        assert ring.resolve(token) is ADMIN
    assert ring.resolve("plain") is None and ring.resolve(None) is None
    assert not KeyRing.build([], None).enabled


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"keys": {}}', '{"keys": [...]}'),
        ('{"keys": [{"name": "a"}]}', "'sha256' is missing"),
        ('{"keys": [{"name": "a b", "sha256": "' + "0" * 64 + '"}]}', "key name"),
        ('{"keys": [{"name": "a", "sha256": "xyz"}]}', "64 hex digits"),
        ('{"keys": [{"name": "a", "role": "root", "sha256": "' + "0" * 64 + '"}]}', "root"),
        ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "quotas": {"queued": -1}}]}', "queued"),
        ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "weight": 0}]}', "weight"),
        (
            '{"keys": [{"name": "a", "sha256": "'
            + "0" * 64
            + '"}, {"name": "a", "sha256": "'
            + "1" * 64
            + '"}]}',
            "twice",
        ),
    ],
)
def test_invalid_files_are_refused_with_the_reason(text, message):
    with pytest.raises(KeysFileError, match=message.replace("[", r"\[").replace("{", r"\{")):
        parse(text)


def test_adding_a_name_twice_or_revoking_an_unknown_name_is_refused():
    keys = KeysFile().with_entry(entry("a", "t"))
    with pytest.raises(KeysFileError, match="exists already"):
        keys.with_entry(entry("a", "u"))
    with pytest.raises(KeysFileError, match="no key named"):
        keys.revoked("b")


def test_the_watcher_follows_changes_within_its_recheck_period(tmp_path):
    path = tmp_path / "keys.json"
    token = new_token()
    save(path, KeysFile().with_entry(entry("team-a", token, weight=2.0)))
    watcher = KeysWatcher(path, ["flag-key"], recheck=0.05, required=True)
    seen: list[dict[str, float]] = []
    watcher.on_change(lambda ring: seen.append(ring.weights()))
    assert watcher.ring().resolve(token).tenant == "team-a"

    save(path, load(path).revoked("team-a"))
    time.sleep(0.06)
    assert watcher.ring().resolve(token) is None
    assert watcher.ring().resolve("flag-key") is ADMIN
    assert seen == [{"team-a": 2.0}, {"team-a": 2.0}]

    # A broken file keeps the last good keys (a half-edited file must not open the server).
    path.write_text("{broken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    time.sleep(0.06)
    assert watcher.ring().enabled and watcher.ring().resolve(token) is None

    # A deleted file revokes its keys; the --api-key keys stay, and auth stays on.
    path.unlink()
    time.sleep(0.06)
    assert watcher.ring().resolve("flag-key") is ADMIN and watcher.ring().enabled


def test_deleting_the_only_keys_never_turns_auth_off(tmp_path):
    path = tmp_path / "keys.json"
    token = new_token()
    save(path, KeysFile().with_entry(entry("only", token)))
    watcher = KeysWatcher(path, recheck=0.05, required=True)
    path.unlink()
    time.sleep(0.06)
    ring = watcher.ring()
    assert ring.enabled and ring.resolve(token) is None and ring.resolve("anything") is None


def test_the_watcher_refuses_a_broken_file_at_start(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text("{broken")
    with pytest.raises(KeysFileError):
        KeysWatcher(path, required=True)


def test_the_watcher_sees_a_keys_file_created_after_start(tmp_path):
    path = tmp_path / "keys.json"
    watcher = KeysWatcher(path, recheck=0.05)
    assert not watcher.ring().enabled
    token = new_token()
    save(path, KeysFile().with_entry(entry("late", token)))
    time.sleep(0.06)
    assert watcher.ring().resolve(token).tenant == "late"


def test_a_missing_explicit_keys_file_fails_at_start(tmp_path):
    from server.config import Settings
    from server.tenants.keys import watcher_of

    with pytest.raises(FileNotFoundError, match="no such file"):
        watcher_of(Settings(data_dir=tmp_path, api_keys_file=tmp_path / "missing.json"))
    assert not watcher_of(Settings(data_dir=tmp_path, api_key=[])).ring().enabled  # default: optional
