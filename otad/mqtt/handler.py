"""amqtt's broker-side protocol handler with a reader loop that ends the connection on bad input.

Defects in amqtt 0.12.1's ``ProtocolHandler._reader_loop``:
- a keepalive expiry only calls ``handle_read_timeout``, which the broker ignores: a vanished client
  stays "connected" forever and its will is never published ([MQTT-3.1.2-24]); and the expiry is
  a ``wait_for`` (a task and a timer) around every packet read;
- a malformed packet (bad remaining length, invalid UTF-8, an oversized body) is "discarded" and the
  loop reads on from the middle of a packet, so the stream never resynchronises and the connection
  is never closed; a reserved packet type only half-closes it.
The MQTT 3.1.1 rule is simple ([MQTT-4.8.0-1]): on a protocol violation, close the network
connection. This loop does that, and publishes the will as for any connection lost without
DISCONNECT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from amqtt.mqtt import packet_class
from amqtt.mqtt.packet import (CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH, PUBREC,
                               PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, MQTTFixedHeader)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.session import OUTGOING

from otad.mqtt.light import LightEvent, LightQueue

log = logging.getLogger(__name__)

_DISPATCH = {
    CONNACK: "handle_connack", SUBSCRIBE: "handle_subscribe", UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback", UNSUBACK: "handle_unsuback", PUBACK: "handle_puback", PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel", PUBCOMP: "handle_pubcomp", PINGREQ: "handle_pingreq", PINGRESP: "handle_pingresp",
    PUBLISH: "handle_publish", DISCONNECT: "handle_disconnect",
}


class OtaProtocolHandler(BrokerProtocolHandler):
    # Set by the broker from mqtt.max_packet_size. amqtt believes any remaining length up to 256 MB
    # and waits for the bytes; a packet announced bigger than this closes the connection instead.
    max_packet_size = 1024 * 1024
    # Set by the broker: the device whose OTA report a PUBLISH is (None: not a report, or not
    # allowed), and the coroutine that applies one and returns once it is durable.
    report_of: Callable[[object, str], str | None] | None = None
    apply_report: Callable[[str, bytes], Awaitable[None]] | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # See otad.mqtt.light: the same behaviour for a fraction of the memory per connection.
        self._pending_subscriptions = LightQueue()  # type: ignore[assignment]
        self._pending_unsubscriptions = LightQueue()  # type: ignore[assignment]
        self._reader_stopped = LightEvent()  # type: ignore[assignment]

    async def start(self) -> None:
        """amqtt's start, with light events."""
        if not self._is_attached():
            raise RuntimeError("handler is not attached to a stream")
        self._reader_ready = LightEvent()  # type: ignore[assignment]
        self._reader_stopped = LightEvent()  # type: ignore[assignment]
        self._reader_task = asyncio.create_task(self._reader_loop())
        await self._reader_ready.wait()
        # [MQTT-4.4.0-1] re-send what is unacknowledged, without holding up the session for the
        # acknowledgements (amqtt waited up to 10 s per message before serving the client). Tasks
        # start in creation order and writes take a FIFO lock, so these go out before the messages
        # queued while offline, which the broker sends next [MQTT-4.6.0-6].
        self._redeliveries = {asyncio.create_task(self._handle_message_flow(message))
                              for message in list(self.session.inflight_out.values())}
        if self._disconnect_waiter is None or self._disconnect_waiter.done():
            self._disconnect_waiter = asyncio.get_running_loop().create_future()

    def _init_session(self, session) -> None:
        super()._init_session(session)
        # amqtt re-arms a write-side keepalive timer on every packet it sends, for a callback the
        # broker leaves empty: a timer per delivered message, for nothing. Only clients ping.
        self.keepalive_timeout = None
        self._last_received = 0.0
        self._keepalive_expired = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._redeliveries: set[asyncio.Task] = set()

    async def _reader_loop(self) -> None:
        assert self.session is not None and self._reader_ready is not None and self.reader is not None
        client_id = self.session.client_id
        loop = asyncio.get_running_loop()
        self._last_received = loop.time()
        if self.session.keep_alive > 0:
            self._watch_keepalive(loop)
        running: set[asyncio.Task] = set()
        self._reader_ready.set()
        try:
            while True:
                header = await MQTTFixedHeader.from_stream(self.reader)
                if header is None:
                    break  # EOF
                self._last_received = loop.time()
                handler_name = _DISPATCH.get(header.packet_type)
                if header.packet_type == CONNECT:
                    log.warning("client %s sent a second CONNECT: closing [MQTT-3.1.0-2]", client_id)
                    break
                if handler_name is None:
                    log.warning("client %s sent reserved packet type %d: closing", client_id, header.packet_type)
                    break
                if header.remaining_length > self.max_packet_size:
                    log.warning("client %s announced a packet of %d bytes, over the limit of %d: closing",
                                client_id, header.remaining_length, self.max_packet_size)
                    break
                packet = await packet_class(header).from_stream(self.reader, fixed_header=header)
                if header.packet_type == PUBLISH:
                    await self._apply_if_report(packet)
                if header.packet_type == PUBLISH and packet.qos == 2:
                    # Its flow waits for the client's PUBREL, which this loop has yet to read.
                    task = asyncio.create_task(self.handle_publish(packet))
                    running.add(task)
                    task.add_done_callback(running.discard)
                else:
                    # Everything else completes at once; handling it inline keeps the packet order
                    # and spares a task per acknowledgement.
                    await getattr(self, handler_name)(packet)
        except asyncio.CancelledError:
            if self._keepalive_expired:
                log.info("client %s sent nothing for 1.5 x its keepalive: closing [MQTT-3.1.2-24]", client_id)
        except Exception as exc:  # malformed input of any kind: close this connection, nothing else
            log.warning("client %s sent a malformed packet (%s): closing", client_id, exc)
        if self._watchdog is not None:
            self._watchdog.cancel()
        for redelivery in self._redeliveries:
            redelivery.cancel()
        for task in running:
            task.cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _apply_if_report(self, packet) -> None:
        """An OTA report is committed before its PUBACK (or PUBREC) goes out, and before this
        connection's next packet is read: a PUBACK means the report is durable, and a device that
        sends faster than reports are applied is slowed down by TCP, not dropped."""
        if self.report_of is None or self.apply_report is None or packet.topic_name is None or packet.data is None:
            return
        device = self.report_of(self.session, packet.topic_name)
        if device is not None:
            await self.apply_report(device, bytes(packet.data))

    def _watch_keepalive(self, loop: asyncio.AbstractEventLoop) -> None:
        """One timer per keepalive period, not one per packet: when it fires it checks when the
        client was last heard from and either ends the connection or sleeps for the remainder."""
        period = self.session.keep_alive  # already 1.5 x the client's keepalive (see OtaBroker)

        def check() -> None:
            remaining = self._last_received + period - loop.time()
            if remaining > 0:
                self._watchdog = loop.call_later(remaining, check)
            elif self._reader_task is not None and not self._reader_task.done():
                self._keepalive_expired = True
                self._reader_task.cancel()

        self._watchdog = loop.call_later(period, check)

    # --- outgoing QoS 1 and 2: keep what the client has not acknowledged ---
    #
    # Defect: amqtt drops an outgoing QoS 1/2 message from the session's in-flight store when the
    # acknowledgement times out (5 s) or the connection ends, so a persistent session that reconnects
    # never gets it again. [MQTT-4.4.0-1]: on reconnect with CleanSession 0 the server re-sends
    # unacknowledged PUBLISH (DUP set) and PUBREL packets; amqtt's ``_retry_deliveries`` does that
    # for whatever is still in ``inflight_out``, so these flows leave it there until acknowledged.

    async def _handle_qos1_message_flow(self, app_message) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos1_message_flow(app_message)
            return
        self.session.inflight_out[app_message.packet_id] = app_message
        publish = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
        await self._send_packet(publish)
        app_message.publish_packet = publish
        puback = await self._wait_ack(self._puback_waiters, app_message.packet_id)
        if puback is not None:
            app_message.puback_packet = puback
            self.session.inflight_out.pop(app_message.packet_id, None)

    async def _handle_qos2_message_flow(self, app_message) -> None:
        if app_message.direction != OUTGOING:
            await super()._handle_qos2_message_flow(app_message)
            return
        self.session.inflight_out[app_message.packet_id] = app_message
        if app_message.pubrec_packet is None:
            publish = app_message.build_publish_packet(dup=app_message.publish_packet is not None)
            await self._send_packet(publish)
            app_message.publish_packet = publish
            app_message.pubrec_packet = await self._wait_ack(self._pubrec_waiters, app_message.packet_id)
            if app_message.pubrec_packet is None:
                return
        app_message.pubrel_packet = PubrelPacket.build(app_message.packet_id)
        await self._send_packet(app_message.pubrel_packet)
        pubcomp = await self._wait_ack(self._pubcomp_waiters, app_message.packet_id)
        if pubcomp is not None:
            app_message.pubcomp_packet = pubcomp
            self.session.inflight_out.pop(app_message.packet_id, None)

    async def _wait_ack(self, waiters: dict, packet_id: int):
        """The acknowledgement, or None when the connection ended first (the message stays in
        flight). No timer: MQTT 3.1.1 re-sends only on reconnect, and a connection that stops
        answering is ended by the keepalive watchdog, which whose end cancels this wait."""
        waiter = asyncio.get_running_loop().create_future()
        waiters[packet_id] = waiter
        try:
            return await waiter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return None  # the waiter was cancelled because the connection ended
        finally:
            if waiters.get(packet_id) is waiter:
                del waiters[packet_id]
