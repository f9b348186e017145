"""Fixtures that start the real daemon: real SQLite in tmp_path, the real embedded broker and the
real HTTP server on free 127.0.0.1 ports, driven over sockets by aiohttp and paho-mqtt clients.

With OTAD_TEST_DATABASE_URL set to a PostgreSQL server's base URL (``.ci/run`` does, for a second
run of the whole suite), every data directory gets its own fresh database there instead of SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest

from otad.config import Settings, load_settings
from otad.daemon import Daemon
from tests.mqtt_device import MqttDevice


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# data dir -> its PostgreSQL database under OTAD_TEST_DATABASE_URL: a test that builds the settings
# of one data dir twice (to restart a daemon on it) finds the same database.
_databases: dict[Path, str] = {}
# The test's own database, also in OTAD_DATABASE_URL for the otad subprocesses it runs: the first
# data dir the test makes settings for gets it, so a daemon started in-process and a command run
# on the same data dir share one database.
_unclaimed: list[str] = []


@pytest.fixture(autouse=True)
def _postgres_per_test(monkeypatch):
    base = os.environ.get("OTAD_TEST_DATABASE_URL")
    if base:
        from tests.postgres import fresh_database  # it imports this module
        url = fresh_database(base)
        monkeypatch.setenv("OTAD_DATABASE_URL", url)
        _unclaimed[:] = [url]
    yield
    _unclaimed.clear()


def database_url_for(data_dir: Path) -> str:
    """The database URL for ``data_dir``: empty (SQLite in it), or its own PostgreSQL database."""
    base = os.environ.get("OTAD_TEST_DATABASE_URL")
    if not base:
        return ""
    key = Path(data_dir).absolute()
    if key not in _databases:
        from tests.postgres import fresh_database
        _databases[key] = _unclaimed.pop() if _unclaimed else fresh_database(base)
    return _databases[key]


def sqlite_only(reason: str):
    """Mark a test that checks SQLite itself (its file, its notices): skipped in the PostgreSQL run."""
    return pytest.mark.skipif(bool(os.environ.get("OTAD_TEST_DATABASE_URL")), reason=f"SQLite only: {reason}")


def make_settings(data_dir: Path, **flags) -> Settings:
    base = {"data_dir": str(data_dir), "http.host": "127.0.0.1", "http.port": free_port(),
            "mqtt.host": "127.0.0.1", "mqtt.port": free_port(), "log_level": "debug",
            "database.url": database_url_for(data_dir)}
    base.update(flags)
    return load_settings({}, {}, base)


def db_query(settings: Settings, query: str, params: tuple = ()) -> list[tuple]:
    """Run one statement straight on the daemon's database, bypassing the daemon: its SQLite file,
    or its PostgreSQL database (``?`` placeholders either way); the rows it returns."""
    if settings.database.url:
        from tests.postgres import fetch
        return fetch(settings.database.url, query, *params)
    with contextlib.closing(sqlite3.connect(settings.database_path)) as conn, conn:
        return conn.execute(query, params).fetchall()


@dataclass
class Otad:
    """A running daemon and what a test needs to talk to it."""

    daemon: Daemon
    token: str
    session: aiohttp.ClientSession

    @property
    def settings(self) -> Settings:
        return self.daemon.settings

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.http_port}"

    @property
    def mqtt_port(self) -> int:
        return self.daemon.mqtt_port

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def request(self, method: str, path: str, *, auth: bool = True, **kwargs):
        """Send a request; return (HTTP status, parsed JSON body)."""
        headers = {**(self.auth if auth else {}), **kwargs.pop("headers", {})}
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as response:
            return response.status, await response.json(content_type=None)

    async def upload(self, name: str, product_id: int, content: bytes, filename: str = "fw.bin", **params):
        form = aiohttp.FormData()
        form.add_field("file", content, filename=filename, content_type="application/octet-stream")
        query = {"name": name, "productId": str(product_id), **params}
        return await self.request("POST", "/api/v2/otaUpload", params=query, data=form)

    async def add_device(self, name: str, product_id: int) -> str:
        status, body = await self.request("POST", "/api/v2/devices", json={"deviceName": name, "productId": product_id})
        assert status == 200, body
        return body["data"]["password"]

    async def enable(self, name: str, device_name: str):
        return await self.request("POST", "/api/v2/otaEnable", params={"name": name, "deviceName": device_name})

    def device(self, name: str, password: str | None, client_id: str | None = None) -> MqttDevice:
        return MqttDevice(self.mqtt_port, name, password, client_id=client_id)

    def db_rows(self, table: str) -> int:
        """Count rows straight from the database, bypassing the daemon."""
        return db_query(self.settings, f'SELECT COUNT(*) FROM "{table}"')[0][0]

    def firmware_files(self) -> list[str]:
        return sorted(p.name for p in self.settings.firmware_dir.rglob("*") if p.is_file())

    async def stop(self) -> None:
        """Close the test's HTTP session and stop the daemon."""
        await self.session.close()
        await self.daemon.stop()

    async def restart(self, **flags) -> None:
        """Stop the daemon and start a new one on the same data dir and ports."""
        settings = self.settings
        await self.daemon.stop()
        self.daemon = Daemon(replace(settings, **flags) if flags else settings)
        await self.daemon.start()


async def start_otad(settings: Settings, clock=None) -> Otad:
    daemon = Daemon(settings, clock) if clock else Daemon(settings)
    await daemon.start()
    token = await daemon.services.admins.create_token("tests")
    return Otad(daemon=daemon, token=token, session=aiohttp.ClientSession())


@contextlib.asynccontextmanager
async def running_otad(settings: Settings, clock=None):
    """A daemon started for the ``async with`` block and stopped after it, whatever happens."""
    instance = await start_otad(settings, clock)
    try:
        yield instance
    finally:
        await instance.stop()


@pytest.fixture
async def otad(tmp_path):
    async with running_otad(make_settings(tmp_path / "data")) as instance:
        yield instance


@pytest.fixture
async def lab(tmp_path):
    """A daemon in lab mode: anonymous clients may use any topic."""
    async with running_otad(make_settings(tmp_path / "lab", **{"mqtt.allow_anonymous": True})) as instance:
        yield instance


async def eventually(predicate, timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` is true; fail (not hang) after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
