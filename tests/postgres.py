"""A real PostgreSQL 15 server for the tests: Debian's binaries, a cluster made by initdb in a temp
dir, listening on 127.0.0.1 and a free port (its unix socket in that dir too), trust auth, fsync off
(a test database need not survive a power cut). Stopped by ``pg_ctl stop``, then by its PID.

``postgres_url`` (session fixture) is the server's base URL, ``postgres://postgres@127.0.0.1:PORT``;
``fresh_database(base_url)`` creates one new empty database for one test and returns its URL.
With ``OTAD_TEST_DATABASE_URL`` set (``.ci/run`` does) that server is used instead of a new one.

Missing binaries: a skip with the reason locally, a failure when ``CI=true`` (CI installs them).

    python -m tests.postgres COMMAND...   runs COMMAND with a server up and OTAD_TEST_DATABASE_URL set
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

ENV_URL = "OTAD_TEST_DATABASE_URL"
START_TIMEOUT = 30.0  # seconds for initdb + start on a loaded CI machine
_numbers = itertools.count(1)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def postgres_bin() -> Path | None:
    """The directory of initdb/pg_ctl/postgres: $OTAD_PG_BIN, else Debian's 15, else any Debian one."""
    if os.environ.get("OTAD_PG_BIN"):
        return Path(os.environ["OTAD_PG_BIN"])
    candidates = ["/usr/lib/postgresql/15/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def unavailable(reason: str):
    """Skip locally, fail under CI: there the PostgreSQL tests are the only check of that engine."""
    if in_ci():
        pytest.fail(f"CI=true and {reason}: the PostgreSQL tests cannot run", pytrace=False)
    pytest.skip(reason)


class PostgresServer:
    """One throwaway cluster. ``start()`` returns when it accepts connections."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="otad-pg-"))
        self.datadir = self.root / "data"
        self.log = self.root / "postgres.log"
        # initdb refuses to run as root: then the cluster belongs to the postgres user.
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def base_url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}"

    def _run(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        result = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}\n{log}")

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        options = " ".join([
            "-c listen_addresses=127.0.0.1", f"-c port={self.port}", f"-c unix_socket_directories={self.root}",
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            # the suite opens a pool per daemon and several daemons at once in the multi-node tests
            "-c max_connections=300",
        ])
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log), "-o", options,
                  "-w", "-t", str(int(START_TIMEOUT)), "start")

    def pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """pg_ctl stop (fast); if that fails or hangs, SIGKILL by PID. Then the temp dir goes."""
        pid = self.pid()
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "-t", "20", "stop",
                      timeout=30)
        except (RuntimeError, subprocess.TimeoutExpired):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """A new server for the block; yields its base URL. Skips or fails (CI) when it cannot start."""
    bindir = postgres_bin()
    if bindir is None:
        unavailable("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it as root)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no postgres user to run initdb as")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server.base_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The base URL of a PostgreSQL server for the session (OTAD_TEST_DATABASE_URL's, or a new one)."""
    if os.environ.get(ENV_URL):
        yield os.environ[ENV_URL].rstrip("/")
        return
    with running_postgres() as url:
        yield url


async def _fetch(url: str, statement: str, args: tuple) -> list[tuple]:
    import asyncpg  # the test extra installs it

    connection = await asyncpg.connect(url, timeout=10)
    try:
        return [tuple(row) for row in await connection.fetch(statement, *args, timeout=30)]
    finally:
        await connection.close(timeout=10)


def fetch(url: str, statement: str, *args) -> list[tuple]:
    """Run one statement on ``url`` and return its rows, from sync code that may itself be inside a
    running event loop (make_settings is called from async tests): in a thread with its own loop.
    ``?`` placeholders, as for SQLite (none of the tests' statements has one in a literal)."""
    numbers = itertools.count(1)
    statement = re.sub(r"\?", lambda _: f"${next(numbers)}", statement)
    result: list = []

    def target() -> None:
        try:
            result.append(asyncio.run(_fetch(url, statement, args)))
        except BaseException as exc:  # re-raised in the caller's thread
            result.append(exc)

    thread = threading.Thread(target=target, name="postgres-fetch")
    thread.start()
    thread.join(60)
    if thread.is_alive():
        raise TimeoutError(f"{statement!r} on {url} did not finish in 60 s")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def fresh_database(base_url: str) -> str:
    """Create a new empty database on the server at ``base_url``; return its URL. Named after this
    process too, so runs sharing one server (OTAD_TEST_DATABASE_URL) never collide."""
    base_url = base_url.rstrip("/")
    name = f"otad_test_{os.getpid()}_{next(_numbers)}"
    fetch(base_url + "/postgres", f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"


def main(argv: list[str]) -> int:
    """Run ``argv`` with a server up and its base URL in OTAD_TEST_DATABASE_URL; stop it after."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    bindir = postgres_bin()
    if bindir is None:
        print("PostgreSQL is not installed (apt-get install postgresql)", file=sys.stderr)
        return 1
    server = PostgresServer(bindir)
    try:
        server.start()
        print(f"PostgreSQL running at {server.base_url} (pid {server.pid()})", file=sys.stderr, flush=True)
        return subprocess.run(argv, env={**os.environ, ENV_URL: server.base_url}).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
