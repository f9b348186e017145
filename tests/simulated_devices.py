"""Devices that do what real ones do with an OTA command: fetch nothing, report, finish.

Each is a raw MQTT connection logged in with its own credentials; on a command it reports
"downloading" then "updated", or "failed" when ``fails(name)`` says so."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from tests.rawmqtt import RawClient, publish_packet


class SimulatedDevice:
    def __init__(self, port: int, name: str, password: str, fails: Callable[[str], bool]) -> None:
        self.name, self.password, self.port, self.fails = name, password, port, fails
        self.client = RawClient(port)
        self.commands: list[str] = []
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        _, code = await self.client.connect(f"{self.name}-sim", self.name, self.password)
        assert code == 0, code
        assert await self.client.subscribe((f"/oc/devices/{self.name}/sys/ota", 1)) == [1]
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                message = await self.client.message(timeout=3600)
                if message.topic != f"/oc/devices/{self.name}/sys/ota":
                    continue
                version = json.loads(message.payload)["version"]
                self.commands.append(version)
                topic = f"/oc/devices/{self.name}/sys/ota/report"
                outcome = "failed" if self.fails(self.name) else "updated"
                for status in ("downloading", outcome):
                    body = json.dumps({"version": version, "status": status, "currentVersion": "2.0"}).encode()
                    self.client.send(publish_packet(topic, body, qos=0))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()


async def start_fleet(port: int, passwords: dict[str, str], fails: Callable[[str], bool]) -> list[SimulatedDevice]:
    fleet = [SimulatedDevice(port, name, password, fails) for name, password in passwords.items()]
    await asyncio.gather(*(device.start() for device in fleet))
    return fleet


async def stop_fleet(fleet: list[SimulatedDevice]) -> None:
    await asyncio.gather(*(device.stop() for device in fleet))
