"""One MQTT client connection as an ``asyncio.Protocol``: packets are parsed straight from the bytes
the transport delivers, with no task, queue or timer of its own.

The connection only needs ``write``, ``close``, ``pause_reading``, ``resume_reading``,
``is_closing`` and ``get_extra_info`` of its transport, so the same class serves a plain TCP
listener, one created with ``loop.create_server(factory, ssl=context)`` (TLS), or any adapter
(a WebSocket, say) that feeds it bytes through ``data_received`` behind a transport-like shim.

What it waits on, it waits on without reading: while the CONNECT is being authenticated, or an OTA
report applied, reading is paused and later bytes stay buffered, so a device sending faster than
reports commit is slowed down by TCP. Deadlines (CONNECT timeout, keepalive) are checked by the
broker's one shared sweep (``otad.mqtt.sweep``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from otad.mqtt import protocol
from otad.mqtt.protocol import MalformedPacket, UnsupportedProtocol

if TYPE_CHECKING:
    from otad.mqtt.broker import Broker
    from otad.mqtt.sessions import Session

log = logging.getLogger(__name__)

WAITING, AUTHENTICATING, OPEN, CLOSED = 0, 1, 2, 3
_BUFFERED_WHILE_WAITING = 65536  # bytes read ahead while a CONNECT is authenticated, then pause
# Fixed-header flags each packet type must carry (2.2.2); PUBLISH's are its own.
_REQUIRED_FLAGS = {protocol.PUBACK: 0, protocol.PUBREC: 0, protocol.PUBREL: 2, protocol.PUBCOMP: 0,
                   protocol.SUBSCRIBE: 2, protocol.UNSUBSCRIBE: 2, protocol.PINGREQ: 0, protocol.DISCONNECT: 0}


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY, as EMQX sets it: asyncio leaves Nagle on for accepted sockets, so a packet
    written after another one still unacknowledged waited for the client's delayed ACK (40 ms on
    Linux): a PUBACK then a report's reply, or a chunk request's PUBACK then its chunk (a paho
    device's chunk round trip 86 -> 45 ms, 6 ms with its own TCP_NODELAY: bench/mqtt_chunks.py)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a socket already reset by its peer


class MqttConnection(asyncio.Protocol):
    __slots__ = ("broker", "transport", "state", "session", "will", "keepalive", "opened_at", "last_received",
                 "_pending", "_blocked", "_paused", "_detached", "_counted", "peer", "_drain")

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.transport: asyncio.Transport | None = None
        self.state = WAITING
        self.session: Session | None = None
        self.will: protocol.Will | None = None
        self.keepalive = 0.0  # seconds allowed between packets (1.5 x the client's keepalive), 0: none
        self.opened_at = 0.0
        self.last_received = 0.0
        self._pending: bytearray | None = None  # bytes received, not yet a whole packet (or not yet read)
        self._blocked = False  # an authentication or a report is pending: later packets wait
        self._paused = False  # the transport is not reading meanwhile
        self._detached = False
        self._counted = False
        self.peer = None
        self._drain: asyncio.Future | None = None  # set while the transport's write buffer is over its high mark

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername")
        self.opened_at = self.last_received = self.broker.now()
        if not self.broker.connection_opened(self):
            self.state = CLOSED
            transport.close()
            return
        self._counted = True
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        if self.state == CLOSED:
            return
        self.last_received = self.broker.now()
        self._feed(data)
        if self._blocked and not self._paused and self._pending and len(self._pending) > _BUFFERED_WHILE_WAITING:
            self._pause()

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    async def drained(self, timeout: float) -> bool:
        """Wait until the transport's write buffer is below its high-water mark (or the connection
        ended); False if it is still over it after ``timeout`` seconds."""
        drain = self._drain
        if drain is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(drain), timeout)
        except TimeoutError:
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume_writing()  # nothing more will drain: whoever waits goes on
        if self.state == WAITING:
            self.broker.refused(self, "no_connect", "connection closed before a complete CONNECT")
        self.state = CLOSED
        self._pending = None
        self.broker.detach(self)
        if self._counted:
            self._counted = False
            self.broker.connection_closed(self)

    # --- the byte stream ---

    def _feed(self, data: bytes | bytearray) -> None:
        if self._pending:
            self._pending += data
            data, self._pending = self._pending, None
        try:
            used = self._consume(data)
        except (MalformedPacket, UnicodeDecodeError, ValueError, IndexError) as exc:
            self._malformed(str(exc))
            return
        except Exception:
            log.exception("MQTT client %s: handling a packet failed; closing", self.describe())
            self.close()
            return
        if self.state != CLOSED and used < len(data):
            self._pending = bytearray(data[used:]) if used or not isinstance(data, bytearray) else data

    def _consume(self, data: bytes | bytearray) -> int:
        """Handle every whole packet in ``data`` until one must be waited on; returns bytes used."""
        position, size, broker = 0, len(data), self.broker
        while position < size and not self._blocked and self.state != CLOSED:
            if self.state == WAITING and data[position] >> 4 != protocol.CONNECT:
                self._refuse_protocol("first packet is not CONNECT")  # [MQTT-3.1.0-1]
                return size
            try:
                split = protocol.split_packet(data, position, broker.max_packet_size)
            except MalformedPacket as exc:
                if self.state == WAITING:
                    self._refuse_protocol(str(exc))
                    return size
                raise
            if split is None:
                break
            first, start, end = split
            position = end
            if self.state == WAITING:
                self._on_connect(data, start, end)
            else:
                self._on_packet(first, data, start, end)
        return position

    def _on_connect(self, data: bytes | bytearray, start: int, end: int) -> None:
        try:
            connect = protocol.decode_connect(data, start, end)
        except UnsupportedProtocol as exc:
            self._refuse_protocol(str(exc), protocol.connack(protocol.UNACCEPTABLE_PROTOCOL))
            return
        except MalformedPacket as exc:
            self._refuse_protocol(str(exc))
            return
        self.state = AUTHENTICATING
        # Not paused: a client waits for its CONNACK before sending much, and pausing costs two
        # epoll calls per handshake. What it sends meanwhile is buffered (up to a bound, then paused).
        self._blocked = True
        self.broker.handshake(self, connect)

    def _on_packet(self, first: int, data: bytes | bytearray, start: int, end: int) -> None:
        kind = first >> 4
        required = _REQUIRED_FLAGS.get(kind)
        if required is not None and first & 0x0F != required:
            raise MalformedPacket(f"packet type {kind} with flags {first & 0x0F:#x}")
        session = self.session
        assert session is not None
        if kind == protocol.PUBLISH:
            self._on_publish(first, data, start, end)
        elif kind == protocol.PUBACK:
            if session.acknowledged(protocol.decode_packet_id(data, start, end), 1):
                self.broker.acknowledged(session)
        elif kind == protocol.PUBREC:
            packet_id = protocol.decode_packet_id(data, start, end)
            if session.released(packet_id):
                self.write(protocol.ack(protocol.PUBREL, packet_id))
        elif kind == protocol.PUBCOMP:
            if session.acknowledged(protocol.decode_packet_id(data, start, end), 2):
                self.broker.acknowledged(session)
        elif kind == protocol.PUBREL:
            packet_id = protocol.decode_packet_id(data, start, end)
            session.release_qos2(packet_id)
            self.write(protocol.ack(protocol.PUBCOMP, packet_id))  # unknown ids too [MQTT-4.3.3-1]
        elif kind == protocol.SUBSCRIBE:
            self.broker.subscribe(self, *protocol.decode_subscribe(data, start, end))
        elif kind == protocol.UNSUBSCRIBE:
            packet_id, filters = protocol.decode_unsubscribe(data, start, end)
            self.broker.unsubscribe(session, filters)
            self.write(protocol.ack(protocol.UNSUBACK, packet_id))
        elif kind == protocol.PINGREQ:
            self.write(protocol.PINGRESP_PACKET)
        elif kind == protocol.DISCONNECT:
            self.will = None  # [MQTT-3.1.2-10]
            self.close()
        elif kind == protocol.CONNECT:
            raise MalformedPacket("a second CONNECT [MQTT-3.1.0-2]")
        else:
            raise MalformedPacket(f"packet type {kind} is not for a server")

    def _on_publish(self, first: int, data: bytes | bytearray, start: int, end: int) -> None:
        topic, qos, packet_id, retain, payload = protocol.decode_publish(first, data, start, end)
        broker = self.broker
        broker.metrics.mqtt_messages_in.inc()
        if not topic or "#" in topic or "+" in topic:
            raise MalformedPacket(f"PUBLISH with an invalid topic {topic!r} [MQTT-3.3.2-2]")
        report = broker.report_of(self.session, topic)  # type: ignore[arg-type]
        if report is None:
            chunks = broker.chunk_server
            device = chunks.request_of(self.session, topic) if chunks is not None else None  # type: ignore[arg-type]
            if device is None:
                self.published(topic, qos, packet_id, retain, payload)
                return
            # A firmware chunk request: the next packet is read once this chunk is on its way.
            self._blocked = True
            self._pause()
            chunks.serve(self, device, (topic, qos, packet_id, retain, payload))
            return
        # An OTA report is committed before its PUBACK (or PUBREC) goes out and before this
        # connection's next packet is read: a PUBACK means the report is durable; a device that
        # sends faster than reports commit is slowed down by TCP.
        self._blocked = True
        self._pause()
        broker.apply_report(self, report, (topic, qos, packet_id, retain, payload))

    def published(self, topic: str, qos: int, packet_id: int, retain: bool, payload: bytes) -> None:
        """Route a client's PUBLISH (if allowed) and acknowledge it."""
        if self.state == CLOSED:
            return
        session = self.session
        assert session is not None
        if qos == 2 and not self.broker.admits_qos2(session, packet_id):
            self.close()  # past the unreleased QoS 2 quota: a client that never sends PUBREL
            return
        route = qos != 2 or session.received_qos2(packet_id)  # a re-sent QoS 2 PUBLISH is routed once
        # Acknowledged before it is routed: a client subscribed to its own topic gets its PUBACK
        # first, as it would from a broker that routes later in the loop.
        if qos == 1:
            self.write(protocol.ack(protocol.PUBACK, packet_id))
        elif qos == 2:
            self.write(protocol.ack(protocol.PUBREC, packet_id))
        if route:
            self.broker.client_publish(session, topic, payload, qos, retain)

    # --- waiting without reading ---

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def unblock(self) -> None:
        """Go on with the packets that arrived meanwhile, then read again."""
        if self.state == CLOSED:
            return
        self._blocked = False
        if self._pending:
            self._feed(b"")
        if not self._blocked and self._paused and self.state != CLOSED and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    @property
    def blocked(self) -> bool:
        return self._blocked

    # --- writing and closing ---

    def write(self, data: bytes) -> None:
        if self.state != CLOSED and self.transport is not None:
            self.transport.write(data)

    def opened(self, session: Session, connack: bytes) -> None:
        self.session = session
        self.state = OPEN
        self.write(connack)

    def close(self) -> None:
        """End the connection: the session is detached now (the will, if any, goes out), the socket
        after what was written to it."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self._pending = None
        self.broker.detach(self)
        if self.transport is not None:
            self.transport.close()

    def discard(self) -> None:
        """End the connection without the session's departure being noted (its session was taken
        over or ended): no will, no presence."""
        self._detached = True
        self.close()

    def take_detach(self) -> bool:
        """True exactly once, for whoever notes this connection's departure."""
        if self._detached:
            return False
        self._detached = True
        return True

    def _refuse_protocol(self, reason: str, reply: bytes = b"") -> None:
        self.broker.refused(self, "protocol", reason)
        if reply:
            self.write(reply)
        self._detached = True
        self.state = CLOSED
        if self.transport is not None:
            self.transport.close()

    def _malformed(self, reason: str) -> None:
        log.warning("MQTT client %s sent a malformed packet (%s): closing", self.describe(), reason)
        self.close()

    def describe(self) -> str:
        if self.session is not None:
            return repr(self.session.key[1])
        return str(self.peer)
