"""A real PostgreSQL server for the tests, started from the binaries the `pgserver` package
ships (Debian's `postgresql` package when that is missing), listening on a free loopback
port with password authentication, so that URLs look like a studio's.

Durability is switched off (fsync, synchronous commit): the tests restart the server with a
clean shutdown, and a crashed test server is thrown away anyway.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

USER, PASSWORD, DATABASE = "flux", "flux-test-password", "flux"
SYSTEM_USER = "pgserver"  # postgres refuses to run as root


def bin_dir() -> Path:
    # Found without importing pgserver (its import sets up runtime folders we do not use).
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (shipped / "pg_ctl").exists():
            return shipped
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not found:
        raise RuntimeError("no PostgreSQL binaries: pip install pgserver, or apt-get install postgresql")
    return Path(found[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    def __init__(self, base: Path) -> None:
        self.bin = bin_dir()
        self.base = base
        self.data = base / "pgdata"
        self.log = base / "postgres.log"
        self.port = _free_port()
        self._as_user: str | None = None
        if os.geteuid() == 0:
            self._ensure_system_user()
            self._as_user = SYSTEM_USER

    def _ensure_system_user(self) -> None:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "-M", "-s", "/bin/false", SYSTEM_USER], check=True, capture_output=True
            )

    def _let_the_system_user_in(self) -> None:
        """The server's user must reach its data directory and the binaries. Done before every
        command: pytest takes the group and other bits off its temporary root when it
        creates the next temporary directory."""
        for path in [self.base, *self.base.parents, self.bin, *self.bin.parents]:
            with contextlib.suppress(PermissionError):
                path.chmod(path.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)

    def _run(self, *args: str) -> None:
        if self._as_user is not None:
            self._let_the_system_user_in()
        as_user = (
            {}
            if self._as_user is None
            else {"user": self._as_user, "group": self._as_user, "extra_groups": []}
        )
        done = subprocess.run(
            [str(self.bin / args[0]), *args[1:]], capture_output=True, text=True, cwd=self.base, **as_user
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
            )

    def init(self) -> None:
        self.data.mkdir(parents=True)
        self.log.touch()
        if self._as_user is not None:
            shutil.chown(self.data, self._as_user, self._as_user)
            shutil.chown(self.log, self._as_user, self._as_user)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        self.start()
        with psycopg.connect(self.superuser_url(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")

    def start(self) -> None:
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.data} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=300"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options, "start"
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", "fast", "stop")

    def superuser_url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.data}&port={self.port}"

    def url(self, database: str = DATABASE, password: str = PASSWORD, **options: str) -> str:
        query = "&".join(f"{key}={value}" for key, value in options.items())
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}" + (
            f"?{query}" if query else ""
        )

    def fresh_schema_url(self) -> str:
        """A URL whose tables live in a new, empty schema: a blank queue in milliseconds."""
        schema = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return self.url(options=f"-csearch_path%3D{schema}")

    def fresh_database_url(self) -> str:
        name = f"d_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.superuser_url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} OWNER {USER}")
        return self.url(database=name)


def start_postgres(base: Path) -> PostgresServer:
    """A running server with its files under `base`, or, when the tests run as root, in a
    folder of the system's temporary directory: postgres must then run as another user,
    and pytest keeps its own temporary root private (mode 0700, reset whenever any pytest
    session on the machine starts), so that user could not reach a folder under it."""
    if os.geteuid() == 0:
        base = Path(tempfile.mkdtemp(prefix="flux-test-postgres-"))
    server = PostgresServer(base)
    server.init()
    return server


def remove(server: PostgresServer) -> None:
    """Stop a server (if it runs) and delete a folder `start_postgres` made outside pytest's."""
    with contextlib.suppress(RuntimeError):
        server.stop()
    if server.base.name.startswith("flux-test-postgres-"):
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole run; tests take fresh databases on it."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        remove(server)
