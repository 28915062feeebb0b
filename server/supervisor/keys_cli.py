"""`flux-server keys add|list|revoke`: the named keys of the keys file (server/tenants/keys.py).

`add` prints the new key once, on stdout, and stores only its hash; `list` never shows a
hash or a key. The file is `--api-keys-file`, else <data-dir>/keys.json. A running server
picks every change up within about a second, without a restart.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from server.tenants.caller import Quotas, Role
from server.tenants.keys import (
    KeyEntry,
    KeysFile,
    KeysFileError,
    check_name,
    hash_token,
    load,
    new_token,
    now_iso,
    save,
)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="named API keys: add, list, revoke (hashes only are stored)")
    keys.add_argument("--data-dir", default=None, help="the keys file is <data-dir>/keys.json by default")
    keys.add_argument("--api-keys-file", default=None, help="the keys file (default <data-dir>/keys.json)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    add = actions.add_parser("add", help="create a key and print it once")
    add.add_argument("name", help="the tenant's name (letters, digits, . _ -)")
    add.add_argument("--role", choices=[role.value for role in Role], default=Role.USER.value)
    add.add_argument("--weight", type=float, default=1.0, help="fair-share weight (default 1)")
    add.add_argument("--queued", type=int, default=None, help="requests waiting or running at once")
    add.add_argument("--per-minute", type=int, default=None, help="submits per minute")
    add.add_argument("--images-per-day", type=int, default=None, help="images per UTC day")
    actions.add_parser("list", help="the keys' names, roles, weights, quotas (never a key or a hash)")
    revoke = actions.add_parser(
        "revoke", help="refuse a key from now on (within seconds on a running server)"
    )
    revoke.add_argument("name")


def keys_file_path(args: argparse.Namespace) -> Path:
    from server.config import Settings

    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    if args.api_keys_file:
        overrides["api_keys_file"] = args.api_keys_file
    return Settings(**overrides).keys_path


def read(path: Path) -> KeysFile:
    if not path.exists():
        return KeysFile()
    keys = load(path)
    if not keys.is_json:
        raise KeysFileError(
            f"{path} holds plain keys, one a line (the legacy format); named keys go to a JSON keys "
            "file: give another --api-keys-file (both may be used, the plain keys through --api-key)"
        )
    return keys


def run_keys(args: argparse.Namespace) -> int:
    path = keys_file_path(args)
    try:
        if args.keys_command == "add":
            return add_key(path, args)
        if args.keys_command == "list":
            return list_keys(path)
        if args.keys_command == "revoke":
            save(path, read(path).revoked(args.name))
            print(f"revoked {args.name} in {path}", file=sys.stderr)
            return 0
    except (KeysFileError, OSError) as exc:
        print(f"flux-server keys: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(args.keys_command)


def add_key(path: Path, args: argparse.Namespace) -> int:
    for flag, value in (
        ("--queued", args.queued),
        ("--per-minute", args.per_minute),
        ("--images-per-day", args.images_per_day),
    ):
        if value is not None and value < 0:
            raise KeysFileError(f"{flag} must be at least 0")
    if not args.weight > 0:
        raise KeysFileError("--weight must be above 0")
    token = new_token()
    entry = KeyEntry(
        name=check_name(args.name),
        role=Role(args.role),
        sha256=hash_token(token),
        weight=args.weight,
        quotas=Quotas(queued=args.queued, per_minute=args.per_minute, images_per_day=args.images_per_day),
        created=now_iso(),
    )
    save(path, read(path).with_entry(entry))
    print(f"added {entry.name} ({entry.role.value}) to {path}; the key, shown this once:", file=sys.stderr)
    print(token)  # stdout holds the key alone, for `KEY=$(flux-server keys add ...)`
    return 0


def list_keys(path: Path) -> int:
    keys = read(path)
    header = ("NAME", "ROLE", "WEIGHT", "QUEUED", "PER_MIN", "PER_DAY", "CREATED")
    print("{:<24} {:<8} {:>6}  {:>6} {:>7} {:>8}  {:<20} STATE".format(*header))
    for entry in keys.entries:
        q = entry.quotas
        limits = [("-" if v is None else str(v)) for v in (q.queued, q.per_minute, q.images_per_day)]
        state = "revoked" if entry.revoked else "active"
        print(
            f"{entry.name:<24} {entry.role.value:<8} {entry.weight:>6g}  {limits[0]:>6} {limits[1]:>7} "
            f"{limits[2]:>8}  {entry.created:<20} {state}"
        )
    return 0
