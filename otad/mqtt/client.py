"""otad as an MQTT 3.1.1 client: one connection to an external broker (mosquitto, EMQX).

A deliberately small client, built on the packet codec the embedded broker uses
(``otad.mqtt.protocol``): CONNECT, PUBLISH at QoS 0/1 (acknowledged by PUBACK), SUBSCRIBE,
keepalive pings and DISCONNECT. Inbound QoS 1 messages are acknowledged by the caller
(``puback``), because otad acknowledges a device's report only once it is committed.
Reconnecting is the owner's business (``otad.mqtt.external``): a connection, once lost, stays lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from otad.mqtt import protocol as p

log = logging.getLogger(__name__)

_U16 = struct.Struct("!H")
_MAX_INBOUND = 16 * 1024**2  # a broker's PUBLISH to otad: reports and dynsec answers, never firmware
_READ_SIZE = 65536
# Outgoing QoS 1 messages awaiting their PUBACK: a campaign enabling 100,000 devices at once waits
# here rather than running out of the 65,535 packet ids (or filling the socket's buffer).
MAX_INFLIGHT = 1000



@dataclass(slots=True)
class Message:
    """An inbound PUBLISH. At QoS 1, ``ack()`` sends its PUBACK; PUBACKs go out in the order the
    messages came ([MQTT-4.6.0-2]) even when they are acknowledged out of order."""

    topic: str
    payload: bytes
    qos: int
    connection: ClientConnection
    packet_id: int = 0
    acked: bool = False

    def ack(self) -> None:
        self.connection._ready(self)


MessageHandler = Callable[[Message], None]

_REFUSALS = {1: "unacceptable protocol version", 2: "client identifier rejected", 3: "server unavailable",
             4: "bad user name or password", 5: "not authorized"}


class ConnectRefused(Exception):
    """The broker answered CONNACK with a refusal: retrying with the same account will not help
    (codes 4 and 5) or might (3)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the broker refused the connection: {_REFUSALS.get(code, f'code {code}')}")
        self.code = code

    @property
    def is_permanent(self) -> bool:
        return self.code in (1, 2, 4, 5)


@dataclass(frozen=True)
class BrokerAddress:
    """Where otad's account on the external broker is: ``mqtt://user:pass@host:port`` or ``mqtts://``."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname or "localhost", parts.port or (8883 if tls else 1883), tls,
                   unquote(parts.username) if parts.username is not None else None,
                   unquote(parts.password) if parts.password is not None else None)

    def describe(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return _U16.pack(len(data)) + data


def connect_packet(client_id: str, clean_session: bool, keepalive: int, username: str | None,
                   password: str | None) -> bytes:
    """A CONNECT (3.1) without a will."""
    flags = (0x02 if clean_session else 0) | (0x80 if username is not None else 0) \
        | (0x40 if password is not None and username is not None else 0)
    body = _string("MQTT") + bytes([p.MQTT_311_LEVEL, flags]) + _U16.pack(keepalive) + _string(client_id)
    if username is not None:
        body += _string(username)
        if password is not None:
            body += _string(password)
    return bytes([p.CONNECT << 4]) + p.remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = _U16.pack(packet_id) + b"".join(_string(topic) + bytes([qos]) for topic, qos in filters)
    return bytes([p.SUBSCRIBE << 4 | 2]) + p.remaining_length(len(body)) + body


class ClientConnection:
    """One open connection; ``open`` returns it after an accepted CONNACK."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keepalive: int,
                 on_message: MessageHandler) -> None:
        self._reader, self._writer = reader, writer
        self._keepalive = keepalive
        self._on_message = on_message
        self._ids = itertools.cycle(range(1, 65536))
        self._waiting: dict[int, asyncio.Future] = {}  # packet id -> PUBACK or SUBACK
        self._unacked: deque[Message] = deque()  # inbound QoS 1, in arrival order
        self._inflight = asyncio.Semaphore(MAX_INFLIGHT)
        self._connack: asyncio.Future = asyncio.get_running_loop().create_future()
        self._last_heard = asyncio.get_running_loop().time()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.session_present = False
        self._tasks = [asyncio.create_task(self._read(), name="otad-mqtt-client-read")]

    @classmethod
    async def open(cls, address: BrokerAddress, client_id: str, *, clean_session: bool, keepalive: int,
                   on_message: MessageHandler, timeout: float) -> ClientConnection:
        """Connect, send CONNECT and wait for CONNACK (all within ``timeout``); raise OSError,
        TimeoutError or ConnectRefused."""
        tls = ssl.create_default_context() if address.tls else None  # the system's CAs
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port, ssl=tls,
                                    server_hostname=address.host if tls else None), timeout)
        connection = cls(reader, writer, keepalive, on_message)
        try:
            writer.write(connect_packet(client_id, clean_session, keepalive, address.username, address.password))
            connection.session_present = await asyncio.wait_for(asyncio.shield(connection._connack), timeout)
        except BaseException:
            connection.abort()
            await connection.wait_closed()
            raise
        if keepalive:
            connection._tasks.append(asyncio.create_task(connection._ping(), name="otad-mqtt-client-ping"))
        return connection

    @property
    def is_open(self) -> bool:
        return not self.closed.done()

    def _next_id(self) -> int:
        if len(self._waiting) >= 65535:  # bounded by MAX_INFLIGHT + the few SUBSCRIBEs: never here
            raise ConnectionError("no MQTT packet id free")
        for packet_id in self._ids:
            if packet_id not in self._waiting:
                return packet_id
        raise AssertionError("unreachable")

    def _send(self, data: bytes) -> None:
        if self.closed.done():
            raise ConnectionError("the MQTT connection is closed")
        self._writer.write(data)

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Send a PUBLISH; at QoS 1 return once the broker acknowledged it (raises ConnectionError
        if the connection ends first: the message may or may not have arrived)."""
        if qos == 0:
            self._send(p.publish(topic, payload, 0, 0, retain=retain))
            try:
                await self.drain()  # a slow broker paces QoS 0 senders too
            except ConnectionError:
                pass  # QoS 0: lost with the connection, as it may be in any case
            return
        async with self._inflight:
            packet_id = self._next_id()
            future = self._waiting[packet_id] = asyncio.get_running_loop().create_future()
            try:
                self._send(p.publish(topic, payload, 1, packet_id, retain=retain))
                await self._writer.drain()
                await future
            finally:
                self._waiting.pop(packet_id, None)

    @property
    def congested(self) -> bool:
        """Whether what was written and not yet taken by the broker is over the transport's
        high-water mark (a ``drain`` would wait)."""
        transport = self._writer.transport
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]

    async def drain(self) -> None:
        """Wait until the write buffer is under its high-water mark; ConnectionError if it ended."""
        await self._writer.drain()

    async def subscribe(self, filters: list[tuple[str, int]]) -> list[int]:
        """Subscribe; return the SUBACK's codes (granted QoS each, or 0x80 refused)."""
        packet_id = self._next_id()
        future = self._waiting[packet_id] = asyncio.get_running_loop().create_future()
        try:
            self._send(subscribe_packet(packet_id, filters))
            return await future
        finally:
            self._waiting.pop(packet_id, None)

    def _ready(self, message: Message) -> None:
        # Nothing is sent once the connection is gone: the broker sends the message again on the
        # next connection of this session.
        message.acked = True
        while self._unacked and self._unacked[0].acked:
            done = self._unacked.popleft()
            if not self.closed.done():
                self._writer.write(p.ack(p.PUBACK, done.packet_id))

    async def _read(self) -> None:
        buffer = bytearray()
        error: BaseException | None = None
        try:
            while chunk := await self._reader.read(_READ_SIZE):
                buffer += chunk
                self._last_heard = asyncio.get_running_loop().time()
                start = 0
                while (packet := p.split_packet(buffer, start, _MAX_INBOUND)) is not None:
                    first, body, end = packet
                    self._handle(first, buffer, body, end)
                    start = end
                del buffer[:start]
            error = ConnectionError("the broker closed the connection")
        except (OSError, p.MalformedPacket, ConnectRefused) as exc:
            error = exc
        except asyncio.CancelledError:
            error = ConnectionError("the MQTT connection was closed")
        finally:
            self._finish(error or ConnectionError("the MQTT connection ended"))

    def _handle(self, first: int, data: bytearray, start: int, end: int) -> None:
        kind = first >> 4
        if kind == p.PUBLISH:
            topic, qos, packet_id, _retain, payload = p.decode_publish(first, data, start, end)
            if qos == 2:
                raise p.MalformedPacket("QoS 2 PUBLISH: otad subscribes at QoS 1 at most")
            message = Message(topic, payload, qos, self, packet_id)
            if qos:
                self._unacked.append(message)
            try:
                self._on_message(message)
            except Exception:
                log.exception("handling a message on %s failed", topic)
        elif kind == p.PUBACK:
            self._resolve(p.decode_packet_id(data, start, end), None)
        elif kind == p.SUBACK:
            self._resolve(_U16.unpack_from(data, start)[0], list(data[start + 2:end]))
        elif kind == p.CONNACK:
            if end - start != 2 or self._connack.done():
                raise p.MalformedPacket("unexpected CONNACK")
            if data[start + 1] != p.ACCEPTED:
                raise ConnectRefused(data[start + 1])
            self._connack.set_result(bool(data[start] & 1))
        elif kind != p.PINGRESP:
            raise p.MalformedPacket(f"unexpected packet type {kind} from the broker")

    def _resolve(self, packet_id: int, result: object) -> None:
        future = self._waiting.get(packet_id)
        if future is not None and not future.done():
            future.set_result(result)

    def _finish(self, error: BaseException) -> None:
        if self.closed.done():
            return
        for future in [self._connack, *self._waiting.values()]:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: nobody may be waiting for it any more
        self.closed.set_result(None)
        self._writer.close()
        log.debug("MQTT client connection ended: %s", error)

    async def _ping(self) -> None:
        # PINGREQ at half the keepalive; a broker silent for 1.5 keepalives is gone (3.1.2.10).
        loop = asyncio.get_running_loop()
        while not self.closed.done():
            await asyncio.sleep(self._keepalive / 2)
            if loop.time() - self._last_heard > self._keepalive * 1.5:
                log.warning("the MQTT broker has not answered for %d s; closing the connection", self._keepalive)
                self.abort()
                return
            with contextlib.suppress(ConnectionError):
                self._send(bytes([p.PINGREQ << 4, 0]))

    def abort(self) -> None:
        """Drop the connection at once (no DISCONNECT: the broker keeps the session as it was)."""
        for task in self._tasks:
            task.cancel()
        self._finish(ConnectionError("the MQTT connection was closed"))
        self._writer.transport.abort()

    async def close(self, timeout: float = 2.0) -> None:
        """DISCONNECT, then close (bounded)."""
        if not self.closed.done():
            with contextlib.suppress(ConnectionError, OSError):
                self._send(bytes([p.DISCONNECT << 4, 0]))
                await asyncio.wait_for(self._writer.drain(), timeout)
        self.abort()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
