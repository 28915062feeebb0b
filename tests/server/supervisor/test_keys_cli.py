"""`flux-server keys add|list|revoke`: the key shown once, only its hash stored, never listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from server.supervisor.cli import main
from server.tenants import Role
from server.tenants.keys import KeyRing, hash_token, load


def keys(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["keys", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_add_list_revoke_round_trip(tmp_path, capsys):
    data = ["--data-dir", str(tmp_path)]
    code, out, err = keys(
        capsys, *data, "add", "team-a", "--role", "user", "--weight", "2", "--queued", "5",
        "--per-minute", "60", "--images-per-day", "1000",
    )  # fmt: skip
    assert code == 0, err
    token = out.strip()
    assert token.startswith("flux_") and "\n" not in token  # stdout holds the key alone
    path = tmp_path / "keys.json"
    text = path.read_text()
    assert token not in text and hash_token(token) in text
    caller = KeyRing.build([], load(path)).resolve(token)
    assert caller is not None and (caller.tenant, caller.role, caller.weight) == ("team-a", Role.USER, 2.0)
    assert (caller.quotas.queued, caller.quotas.per_minute, caller.quotas.images_per_day) == (5, 60, 1000)

    code, out, _ = keys(capsys, *data, "add", "ops", "--role", "admin")
    admin_token = out.strip()
    code, listing, _ = keys(capsys, *data, "list")
    assert code == 0
    lines = listing.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ROLE", "WEIGHT"]
    assert lines[1].split()[:6] == ["team-a", "user", "2", "5", "60", "1000"] and lines[1].endswith("active")
    assert lines[2].split()[:3] == ["ops", "admin", "1"]
    for secret in (token, admin_token, hash_token(token), hash_token(admin_token)):
        assert secret not in listing

    code, _, err = keys(capsys, *data, "revoke", "team-a")
    assert code == 0 and "revoked team-a" in err
    assert KeyRing.build([], load(path)).resolve(token) is None
    assert KeyRing.build([], load(path)).resolve(admin_token) is not None
    _, listing, _ = keys(capsys, *data, "list")
    assert listing.splitlines()[1].endswith("revoked")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "bad name"], "key name"),
        (["add", "x", "--weight", "0"], "--weight"),
        (["add", "x", "--queued", "-1"], "--queued"),
        (["revoke", "nobody"], "no key named"),
    ],
)
def test_refusals_name_the_problem(tmp_path, capsys, argv, message):
    code, out, err = keys(capsys, "--data-dir", str(tmp_path), *argv)
    assert code == 2 and message in err and out == ""


def test_a_name_is_added_once_and_a_legacy_file_is_not_rewritten(tmp_path, capsys):
    assert keys(capsys, "--data-dir", str(tmp_path), "add", "a")[0] == 0
    code, _, err = keys(capsys, "--data-dir", str(tmp_path), "add", "a")
    assert code == 2 and "exists already" in err
    legacy = tmp_path / "plain.txt"
    legacy.write_text("plain-key\n")
    code, _, err = keys(capsys, "--api-keys-file", str(legacy), "add", "b")
    assert code == 2 and "legacy" in err and legacy.read_text() == "plain-key\n"


def test_the_command_line_tool_prints_the_key_on_stdout_only(tmp_path):
    """The installed entry point, as an operator runs it (`KEY=$(flux-server keys add ...)`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    done = subprocess.run(
        [sys.executable, "-m", "server.supervisor.cli", "keys", "--data-dir", str(tmp_path), "add", "cli"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token not in done.stderr and "cli" in done.stderr
    entries = json.loads((tmp_path / "keys.json").read_text())["keys"]
    assert entries[0]["sha256"] == hash_token(token) and "token" not in entries[0]
