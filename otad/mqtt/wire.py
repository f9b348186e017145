"""What otad checks on the wire before amqtt sees a connection.

amqtt 0.12.1 reads the first packet with no time limit (a silent or half-sent CONNECT holds the
socket forever), parses an MQTT 5 CONNECT as 3.1.1 and then waits for bytes that never come, and
believes any remaining length up to 256 MB. The listener therefore reads the first packet itself,
within ``connect_timeout`` and ``max_packet_size``, answers a protocol it does not speak with
CONNACK 0x01 (MQTT 3.1.1 section 3.2.2.3), and hands the bytes on through ``ReplayReader``.
Later packets are bounded by ``OtaProtocolHandler`` from their fixed header.
"""

from __future__ import annotations

import asyncio

from amqtt.adapters import StreamReaderAdapter

CONNECT = 1
CONNACK_UNACCEPTABLE_PROTOCOL = bytes([0x20, 0x02, 0x00, 0x01])
_MQTT_311_LEVEL = 4


class ProtocolRefused(Exception):
    """The first packet is not an MQTT 3.1.1 CONNECT we accept; ``reply`` (if any) goes back first."""

    def __init__(self, reason: str, reply: bytes = b"") -> None:
        super().__init__(reason)
        self.reply = reply


async def read_remaining_length(reader: asyncio.StreamReader) -> int:
    multiplier, value = 1, 0
    for _ in range(4):
        digit = (await reader.readexactly(1))[0]
        value += (digit & 0x7F) * multiplier
        if not digit & 0x80:
            return value
        multiplier *= 128
    raise ProtocolRefused("malformed remaining length")  # [MQTT-2.2.3] at most four bytes


async def read_first_packet(reader: asyncio.StreamReader, max_size: int) -> bytes:
    """The raw first packet, checked to be an MQTT 3.1.1 CONNECT; raises ProtocolRefused otherwise."""
    first = await reader.readexactly(1)
    if first[0] >> 4 != CONNECT:
        raise ProtocolRefused("first packet is not CONNECT")  # [MQTT-3.1.0-1]
    length = await read_remaining_length(reader)
    if length > max_size:
        raise ProtocolRefused(f"CONNECT of {length} bytes is over the limit")
    body = await reader.readexactly(length)
    name_length = int.from_bytes(body[:2], "big")
    name, level = body[2:2 + name_length], body[2 + name_length:3 + name_length]
    if name not in (b"MQTT", b"MQIsdp") or not level:
        raise ProtocolRefused("not an MQTT CONNECT")
    if level[0] != _MQTT_311_LEVEL:
        raise ProtocolRefused(f"MQTT protocol level {level[0]} is not supported (3.1.1 only)",
                              reply=CONNACK_UNACCEPTABLE_PROTOCOL)
    return first + _encode_length(length) + body


def _encode_length(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


class ReplayReader(StreamReaderAdapter):
    """amqtt's stream adapter, first replaying the bytes of the CONNECT we already read."""

    def __init__(self, reader: asyncio.StreamReader, replay: bytes) -> None:
        super().__init__(reader)
        self._replay = replay

    async def read(self, n: int = -1) -> bytes:
        if self._replay:
            if 0 <= n <= len(self._replay):
                data, self._replay = self._replay[:n], self._replay[n:]
                return data
            data, self._replay = self._replay, b""
            rest = await self._reader.read(-1) if n < 0 else await self._reader.readexactly(n - len(data))
            return data + rest
        return await super().read(n)
