"""A minimal MQTT 3.1.1 client on raw asyncio streams.

For what paho cannot do on purpose (withhold a PUBACK, send garbage or an MQTT 5 CONNECT, stop
pinging) and for benchmarks, where the client must not be the bottleneck.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + remaining_length(len(body)) + body


def connect_packet(client_id: str, username: str | None = None, password: str | None = None, *,
                   clean: bool = True, keepalive: int = 60, will: tuple[str, bytes, int, bool] | None = None,
                   level: int = 4) -> bytes:
    flags = (0x02 if clean else 0) | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    payload = _string(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _string(topic) + _string(message)
    if username is not None:
        payload += _string(username)
    if password is not None:
        payload += _string(password)
    variable = _string("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive)
    if level == 5:
        variable += b"\x00"  # MQTT 5 CONNECT properties: none
    return packet(CONNECT, 0, variable + payload)


def publish_packet(topic: str, payload: bytes, qos: int = 0, packet_id: int = 1, *, retain: bool = False,
                   dup: bool = False) -> bytes:
    flags = (qos << 1) | (1 if retain else 0) | (8 if dup else 0)
    body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(PUBLISH, flags, body)


def subscribe_packet(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!H", packet_id) + b"".join(_string(topic) + bytes([qos]) for topic, qos in filters)
    return packet(SUBSCRIBE, 2, body)


def unsubscribe_packet(packet_id: int, filters: list[str]) -> bytes:
    return packet(UNSUBSCRIBE, 2, struct.pack("!H", packet_id) + b"".join(_string(topic) for topic in filters))


def ack_packet(kind: int, packet_id: int) -> bytes:
    return packet(kind, 2 if kind == PUBREL else 0, struct.pack("!H", packet_id))


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    first = await reader.readexactly(1)
    multiplier, length = 1, 0
    while True:
        digit = (await reader.readexactly(1))[0]
        length += (digit & 0x7F) * multiplier
        multiplier *= 128
        if not digit & 0x80:
            break
    return first[0] >> 4, first[0] & 0x0F, await reader.readexactly(length)


def parse_publish(flags: int, body: bytes) -> Message:
    qos = (flags >> 1) & 3
    (topic_length,) = struct.unpack("!H", body[:2])
    topic = body[2:2 + topic_length].decode()
    rest = body[2 + topic_length:]
    packet_id = None
    if qos:
        (packet_id,), rest = struct.unpack("!H", rest[:2]), rest[2:]
    return Message(topic, bytes(rest), qos, bool(flags & 1), bool(flags & 8), packet_id)


class RawClient:
    """One connection. ``auto_ack`` answers QoS 1/2 deliveries as a normal client would."""

    def __init__(self, port: int, *, auto_ack: bool = True) -> None:
        self.port = port
        self.auto_ack = auto_ack
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._next_id = 0

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def connect(self, client_id: str, username: str | None = None, password: str | None = None,
                      **options) -> tuple[bool, int]:
        """Open, CONNECT, and return (session present, CONNACK return code)."""
        await self.open()
        self.send(connect_packet(client_id, username, password, **options))
        kind, _, body = await asyncio.wait_for(read_packet(self.reader), 5)
        assert kind == CONNACK, kind
        return bool(body[0] & 1), body[1]

    def packet_id(self) -> int:
        self._next_id = self._next_id % 65535 + 1
        return self._next_id

    async def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        self.send(subscribe_packet(self.packet_id(), list(filters)))
        while True:
            kind, _, body = await self.read()
            if kind == SUBACK:
                return list(body[2:])

    async def publish(self, topic: str, payload: bytes, qos: int = 0, *, retain: bool = False) -> None:
        packet_id = self.packet_id()
        self.send(publish_packet(topic, payload, qos, packet_id, retain=retain))
        if qos == 1:
            await self._await_ack(PUBACK)
        elif qos == 2:
            await self._await_ack(PUBREC)
            self.send(ack_packet(PUBREL, packet_id))
            await self._await_ack(PUBCOMP)

    async def _await_ack(self, kind: int) -> None:
        while True:
            got, _, _ = await self.read()
            if got == kind:
                return

    async def read(self, timeout: float = 5.0) -> tuple[int, int, bytes]:
        assert self.reader is not None
        return await asyncio.wait_for(read_packet(self.reader), timeout)

    async def message(self, timeout: float = 5.0) -> Message:
        """The next PUBLISH delivered to us (acknowledged when ``auto_ack``)."""
        while True:
            kind, flags, body = await self.read(timeout)
            if kind != PUBLISH:
                continue
            message = parse_publish(flags, body)
            if self.auto_ack and message.qos == 1:
                self.send(ack_packet(PUBACK, message.packet_id))
            elif self.auto_ack and message.qos == 2:
                self.send(ack_packet(PUBREC, message.packet_id))
            return message

    async def no_message(self, within: float = 0.5) -> bool:
        try:
            await self.message(within)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return True
        return False

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within ``timeout``."""
        assert self.reader is not None
        try:
            while await asyncio.wait_for(self.reader.read(4096), timeout):
                pass
        except (asyncio.TimeoutError, TimeoutError):
            return False
        except ConnectionError:
            pass
        return True

    async def disconnect(self) -> None:
        """A clean DISCONNECT."""
        self.send(packet(DISCONNECT, 0, b""))
        await self.close()

    async def close(self) -> None:
        """Drop the connection without DISCONNECT."""
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except ConnectionError:
                pass
            self.writer = None
