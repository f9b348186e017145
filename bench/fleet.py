"""Thousands of MQTT 3.1.1 devices in one process, on bare asyncio protocols (no per-message
coroutine), so the benchmark measures the broker rather than the client."""

from __future__ import annotations

import asyncio
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.rawmqtt import connect_packet, subscribe_packet  # noqa: E402


class Device(asyncio.Protocol):
    def __init__(self, fleet: "Fleet", client_id: str, username: str | None, password: str | None, topic: str):
        self.fleet, self.topic = fleet, topic
        self.connect = connect_packet(client_id, username, password, keepalive=600)
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.subscribed = fleet.loop.create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.connect)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            length, offset, multiplier = 0, 1, 1
            while True:
                if offset >= len(self.buffer):
                    return
                digit = self.buffer[offset]
                length += (digit & 0x7F) * multiplier
                multiplier *= 128
                offset += 1
                if not digit & 0x80:
                    break
            if len(self.buffer) < offset + length:
                return
            kind, flags = self.buffer[0] >> 4, self.buffer[0] & 0x0F
            body = bytes(self.buffer[offset:offset + length])
            del self.buffer[:offset + length]
            self.on_packet(kind, flags, body)

    def on_packet(self, kind: int, flags: int, body: bytes) -> None:
        if kind == 2:  # CONNACK
            if body[1] != 0:
                self.subscribed.set_exception(RuntimeError(f"CONNACK {body[1]}"))
                return
            self.transport.write(subscribe_packet(1, [(self.topic, 1)]))
        elif kind == 9 and not self.subscribed.done():  # SUBACK
            self.subscribed.set_result(body[2])
        elif kind == 3:  # PUBLISH
            qos = (flags >> 1) & 3
            (topic_length,) = struct.unpack("!H", body[:2])
            if qos:
                packet_id = body[2 + topic_length:4 + topic_length]
                self.transport.write(b"\x40\x02" + packet_id)
            self.fleet.received()

    def connection_lost(self, exc) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError("closed before SUBACK"))


class Fleet:
    def __init__(self, port: int) -> None:
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.devices: list[Device] = []
        self.count = 0
        self._target = 0
        self._done: asyncio.Future | None = None

    async def connect_all(self, names: list[str], passwords: dict[str, str] | None, in_flight: int = 64) -> None:
        """Connect every device and wait for every SUBACK, with at most ``in_flight`` handshakes
        open at a time: SYNs are paced, so no broker's accept queue overflows and no 1-second SYN
        retransmit hides in the figures. Past 20,000 devices the source address varies over
        127.0.0.1-127.0.0.8, as one address has fewer ephemeral ports than that."""
        gate = asyncio.Semaphore(in_flight)
        spread = len(names) > 20_000

        async def one(index: int, name: str) -> None:
            password = passwords[name] if passwords else None
            device = Device(self, name, name if passwords else None, password, f"/oc/devices/{name}/sys/ota")
            local = (f"127.0.0.{1 + index % 8}", 0) if spread else None
            async with gate:
                await self.loop.create_connection(lambda: device, "127.0.0.1", self.port, local_addr=local)
                self.devices.append(device)
                await device.subscribed
        await asyncio.gather(*(one(index, name) for index, name in enumerate(names)))

    def expect(self, count: int) -> asyncio.Future:
        self.count, self._target = 0, count
        self._done = self.loop.create_future()
        return self._done

    def received(self) -> None:
        self.count += 1
        if self._done is not None and self.count >= self._target and not self._done.done():
            self._done.set_result(self.loop.time())

    def close(self) -> None:
        for device in self.devices:
            if device.transport is not None:
                device.transport.close()
