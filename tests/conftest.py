"""Fixtures that start the real daemon: real SQLite in tmp_path, the real embedded broker and the
real HTTP server on free 127.0.0.1 ports, driven over sockets by aiohttp and paho-mqtt clients."""

from __future__ import annotations

import asyncio
import contextlib
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


def make_settings(data_dir: Path, **flags) -> Settings:
    base = {"data_dir": str(data_dir), "http.host": "127.0.0.1", "http.port": free_port(),
            "mqtt.host": "127.0.0.1", "mqtt.port": free_port(), "log_level": "debug"}
    base.update(flags)
    return load_settings({}, {}, base)


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
        """Count rows straight from the SQLite file, bypassing the daemon."""
        with sqlite3.connect(f"file:{self.settings.database_path}?mode=ro", uri=True) as conn:
            return conn.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0]

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
