"""The MQTT 3.1.1 packet codec: packets split from a byte buffer, decoded, and encoded.

Pure functions over bytes, no I/O: ``otad.mqtt.connection`` feeds it what the transport delivered.
Anything that breaks the rules of the encoding raises ``MalformedPacket``; the connection closes on
it ([MQTT-4.8.0-1]). Section numbers refer to the OASIS MQTT 3.1.1 standard.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

ACCEPTED, UNACCEPTABLE_PROTOCOL, IDENTIFIER_REJECTED, NOT_AUTHORIZED = 0x00, 0x01, 0x02, 0x05
SUBSCRIPTION_REFUSED = 0x80
MQTT_311_LEVEL = 4

PINGRESP_PACKET = bytes([PINGRESP << 4, 0])
_U16 = struct.Struct("!H")


class MalformedPacket(Exception):
    """The bytes break the MQTT 3.1.1 encoding rules: the connection must be closed."""


def split_packet(buffer: bytes | bytearray, start: int, max_size: int) -> tuple[int, int, int] | None:
    """(first byte, body start, body end) of the packet at ``start``, or None while incomplete.

    Raises MalformedPacket for a remaining length over four bytes (2.2.3) or over ``max_size``.
    """
    end = len(buffer)
    index, multiplier, length = start + 1, 1, 0
    while True:
        if index >= end:
            return None
        digit = buffer[index]
        length += (digit & 0x7F) * multiplier
        index += 1
        if not digit & 0x80:
            break
        multiplier *= 128
        if multiplier > 128 ** 3:
            raise MalformedPacket("remaining length longer than four bytes")
    if length > max_size:
        raise MalformedPacket(f"packet of {length} bytes is over the limit of {max_size}")
    if index + length > end:
        return None
    return buffer[start], index, index + length


def remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        digit, length = length % 128, length // 128
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


class Reader:
    """Reads the fields of one packet body; every overrun or bad string is MalformedPacket."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes | bytearray | memoryview, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def remaining(self) -> int:
        return self.end - self.pos

    def u8(self) -> int:
        if self.pos >= self.end:
            raise MalformedPacket("packet ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        if self.pos + 2 > self.end:
            raise MalformedPacket("packet ends early")
        self.pos += 2
        return (self.data[self.pos - 2] << 8) | self.data[self.pos - 1]

    def binary(self) -> bytes:
        length = self.u16()
        if self.pos + length > self.end:
            raise MalformedPacket("field longer than the packet")
        self.pos += length
        return bytes(self.data[self.pos - length:self.pos])

    def string(self) -> str:
        try:
            text = self.binary().decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket("string is not UTF-8") from None
        if "\0" in text:
            raise MalformedPacket("string contains U+0000")  # [MQTT-1.5.3-2]
        return text

    def rest(self) -> bytes:
        data = bytes(self.data[self.pos:self.end])
        self.pos = self.end
        return data


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(slots=True)
class Connect:
    client_id: str
    clean_session: bool
    keepalive: int
    username: str | None
    password: bytes | None
    will: Will | None


class UnsupportedProtocol(Exception):
    """A CONNECT of a protocol level other than 3.1.1: answered with CONNACK 0x01 (3.2.2.3)."""


def check_connect_header(reader: Reader) -> None:
    """The protocol name and level of a CONNECT (3.1.2.1, 3.1.2.2)."""
    name = reader.binary()
    if name not in (b"MQTT", b"MQIsdp"):
        raise MalformedPacket("not an MQTT CONNECT")
    level = reader.u8()
    if level != MQTT_311_LEVEL:
        raise UnsupportedProtocol(f"MQTT protocol level {level} is not supported (3.1.1 only)")


def decode_connect(data: bytes | bytearray, start: int, end: int) -> Connect:
    reader = Reader(data, start, end)
    check_connect_header(reader)
    flags = reader.u8()
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")  # [MQTT-3.1.2-3]
    keepalive = reader.u16()
    client_id = reader.string()
    will = None
    if flags & 0x04:
        qos = (flags >> 3) & 3
        if qos == 3:
            raise MalformedPacket("will QoS 3")  # [MQTT-3.1.2-14]
        will = Will(reader.string(), reader.binary(), qos, bool(flags & 0x20))
    elif flags & 0x38:
        raise MalformedPacket("will QoS or retain without a will")  # [MQTT-3.1.2-13, -15]
    username = reader.string() if flags & 0x80 else None
    password = reader.binary() if flags & 0x40 else None
    if password is not None and username is None:
        raise MalformedPacket("password without a user name")  # [MQTT-3.1.2-22]
    return Connect(client_id, bool(flags & 0x02), keepalive, username, password, will)


def decode_publish(first: int, data: bytes | bytearray, start: int, end: int) -> tuple[str, int, int, bool, bytes]:
    """(topic, QoS, packet id or 0, retain, payload)."""
    qos = (first >> 1) & 3
    if qos == 3:
        raise MalformedPacket("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
    reader = Reader(data, start, end)
    topic = reader.string()
    packet_id = reader.u16() if qos else 0
    if qos and not packet_id:
        raise MalformedPacket("PUBLISH packet id 0")
    return topic, qos, packet_id, bool(first & 1), reader.rest()


def decode_packet_id(data: bytes | bytearray, start: int, end: int) -> int:
    if end - start != 2:
        raise MalformedPacket("acknowledgement of the wrong length")
    return (data[start] << 8) | data[start + 1]


def decode_subscribe(data: bytes | bytearray, start: int, end: int) -> tuple[int, list[tuple[str, int]]]:
    reader = Reader(data, start, end)
    packet_id = reader.u16()
    filters = []
    while reader.remaining():
        topic_filter = reader.string()
        qos = reader.u8()
        if qos > 2:
            raise MalformedPacket("SUBSCRIBE with a requested QoS over 2")  # [MQTT-3.8.3-4]
        filters.append((topic_filter, qos))
    if not filters:
        raise MalformedPacket("SUBSCRIBE without a topic filter")  # [MQTT-3.8.3-3]
    return packet_id, filters


def decode_unsubscribe(data: bytes | bytearray, start: int, end: int) -> tuple[int, list[str]]:
    reader = Reader(data, start, end)
    packet_id = reader.u16()
    filters = []
    while reader.remaining():
        filters.append(reader.string())
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter")  # [MQTT-3.10.3-2]
    return packet_id, filters


def is_valid_filter(topic_filter: str) -> bool:
    """4.7.1: ``#`` only as the whole last level, ``+`` only as a whole level."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


# --- encoding ---

def connack(return_code: int, session_present: bool = False) -> bytes:
    return bytes([CONNACK << 4, 2, 1 if session_present else 0, return_code])


def ack(kind: int, packet_id: int) -> bytes:
    return bytes([kind << 4 | (2 if kind == PUBREL else 0), 2]) + _U16.pack(packet_id)


def suback(packet_id: int, codes: list[int]) -> bytes:
    return bytes([SUBACK << 4]) + remaining_length(2 + len(codes)) + _U16.pack(packet_id) + bytes(codes)


def publish_head(topic: bytes, qos: int, retain: bool, dup: bool, payload_length: int) -> bytes:
    """Everything of a PUBLISH before its packet id (or, at QoS 0, before its payload)."""
    first = PUBLISH << 4 | (8 if dup else 0) | qos << 1 | (1 if retain else 0)
    length = 2 + len(topic) + (2 if qos else 0) + payload_length
    return bytes([first]) + remaining_length(length) + _U16.pack(len(topic)) + topic


def publish(topic: str, payload: bytes, qos: int, packet_id: int, *, retain: bool = False, dup: bool = False) -> bytes:
    head = publish_head(topic.encode(), qos, retain, dup, len(payload))
    return head + (_U16.pack(packet_id) if qos else b"") + payload


def packet_id_bytes(packet_id: int) -> bytes:
    return _U16.pack(packet_id)
