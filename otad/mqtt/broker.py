"""amqtt's ``Broker`` with the defects otad depends on fixed (amqtt 0.12.1).

Each override names the defect it fixes; ``tests/test_broker_conformance.py``, ``test_mqtt_acl.py``
and ``test_offline.py`` fail without them. Access decisions come from our ``AccessPolicy``, not from
amqtt plugins, so one place says who may do what.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.errors import MQTTError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.session import Session
from amqtt.utils import gen_client_id

from otad.metrics import Metrics
from otad.mqtt.access import AccessPolicy, Verdict
from otad.mqtt.events import DeviceEvents
from otad.mqtt.handler import OtaProtocolHandler
from otad.mqtt.session import use_light_sessions
from otad.mqtt.index import SubscriptionIndex
from otad.mqtt.topics import reporting_device

log = logging.getLogger(__name__)


class OtaBroker(SubscriptionIndex, Broker):
    def __init__(self, config: dict[str, Any], policy: AccessPolicy, max_packet_size: int,
                 events: DeviceEvents, metrics: Metrics) -> None:
        use_light_sessions()
        super().__init__(config)
        self._policy = policy
        self._max_packet_size = max_packet_size
        self._events = events
        self._metrics = metrics
        metrics.connected_devices.set_function(self.connected_count)
        self._deliveries: set[asyncio.Future] = set()
        self._init_index()

    # --- connecting: authentication before any session state is touched ---

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):  # type: ignore[override]
        """Authenticate the CONNECT before amqtt merges it into an existing session.

        Defect: amqtt resolves the client id first (a clean CONNECT deletes the existing session of
        that id, a persistent one takes it over and its queued messages) and only then asks the auth
        plugins; a refused client stays registered as connected. A wrong password could so wipe or
        read another device's session. Here a refused CONNECT gets CONNACK 0x05 and touches nothing,
        and sessions are per username, so no device reaches another's session by its client id.
        """
        handler, incoming = await OtaProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        handler.max_packet_size = self._max_packet_size
        handler.report_of = self._report_of
        handler.apply_report = self._events.report
        verdict = await self._policy.authenticate(incoming.username, incoming.password)
        if (verdict != Verdict.REFUSED and incoming.will_flag
                and not self._policy.may_publish(verdict, incoming.username, incoming.will_topic or "")):
            # amqtt publishes (and retains) a will without the topic ACL: a device could leave a
            # forged OTA command on another device's topic. A will is only for the client's own topics.
            log.warning("MQTT CONNECT of %r refused: will topic %r is not its own", incoming.username,
                        incoming.will_topic)
            verdict = Verdict.REFUSED
        if verdict == Verdict.REFUSED:
            log.warning("MQTT login refused for %r from %s:%s", incoming.username, remote_address, remote_port)
            self._metrics.mqtt_refused.labels("not_authorized").inc()
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError("not authorized")
        # Sessions are keyed by (username, client id): one device can neither take over nor lock
        # out another's session by presenting its client id. U+0000 cannot occur in either part
        # [MQTT-1.5.3-2], so the key is unambiguous.
        incoming.client_id = f"{incoming.username or ''}\0{incoming.client_id or gen_client_id()}"
        existing = self._sessions.get(incoming.client_id, (None, None))[0]

        if incoming.clean_session:
            if existing is not None and existing.transitions.is_connected():
                # [MQTT-3.1.4-2] close the previous connection, which amqtt left running detached.
                _, old_handler = self._sessions[incoming.client_id]
                await old_handler.handle_connection_closed()
                await old_handler.stop()
            await self._delete_session(incoming.client_id)
            incoming.parent = 0
            session = incoming
        elif existing is not None:
            for attribute in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain",
                              "keep_alive", "username", "password"):
                setattr(existing, attribute, getattr(incoming, attribute))
            existing.parent = 1
            session = existing
        else:
            incoming.parent = 0
            session = incoming
        session.otad_verdict = verdict
        if session.keep_alive > 0:
            # [MQTT-3.1.2-24] the server allows one and a half keepalive periods.
            session.keep_alive = math.ceil(session.keep_alive * 1.5)
        return handler, session

    async def _authenticate(self, session: Session, _listener: Any) -> bool:
        return session.otad_verdict in (Verdict.DEVICE, Verdict.ANONYMOUS)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        check = self._policy.may_publish if action == Action.PUBLISH else self._policy.may_use
        allowed = check(session.otad_verdict, session.username, topic)
        if not allowed and action != Action.RECEIVE:
            log.warning("MQTT %s refused: %r may not use %r", action.value, session.username, topic)
        return allowed

    def _report_of(self, session: Session, topic: str) -> str | None:
        """The device whose OTA report a PUBLISH on ``topic`` is, if the session may publish it."""
        device = reporting_device(topic)
        if device is None or not self._policy.may_publish(session.otad_verdict, session.username, topic):
            return None
        return device

    async def _handle_client_session(self, reader, writer, client_session, handler, server, listener_name):  # type: ignore[override]
        """amqtt's session start without its retained-message leak.

        Defect: on every CONNECT amqtt publishes the retained messages matching *every* session's
        subscription filters to the new client, unchecked by the topic ACL, so one device received
        another's OTA command. MQTT 3.1.1 sends retained messages on SUBSCRIBE only (3.3.1.3), which
        ``_handle_subscription`` still does after the ACL check; a resumed session gets its queued
        messages instead.
        """
        if not await self._authenticate(client_session, None):
            return
        previous = self._sessions.get(client_session.client_id)
        handler.attach(client_session, reader, writer)
        # Registered before the old connection is told to go, so its teardown sees it was replaced.
        self._sessions[client_session.client_id] = (client_session, handler)
        if client_session.transitions.is_connected():
            # Until the CONNACK is out, messages for this session are queued, not written to the new
            # socket ahead of it [MQTT-3.2.0-1].
            client_session.transitions.disconnect()
            if previous is not None:
                # [MQTT-3.1.4-2] the same client connected again: close its old connection.
                log.info("client %s reconnected: closing its previous connection", client_session.client_id)
                await previous[1].handle_connection_closed()
                await previous[1].stop()
        await handler.mqtt_connack_authorize(True)
        client_session.transitions.connect()
        # What this connection will get anyway, re-sent from the in-flight store: a re-SUBSCRIBE
        # must not add the retained copy of the same command.
        client_session.otad_sent = {m.topic: m.data for m in client_session.inflight_out.values()
                                    if m.topic in self._retained_messages}
        if client_session.otad_verdict == Verdict.DEVICE:
            self._events.presence(client_session.username, True)
        await handler.start()  # re-sends unacknowledged QoS 1/2 messages with DUP [MQTT-4.4.0-1]
        await self._publish_session_retained_messages(client_session)
        await self._client_message_loop(client_session, handler)

    async def _handle_disconnect(self, client_session: Session, handler, disconnect_waiter) -> None:
        """Defect: after a takeover amqtt lets the old connection's teardown mark the shared
        session disconnected, so the new connection's messages were queued instead of sent."""
        current = self._sessions.get(client_session.client_id)
        if current is not None and current[1] is not handler:
            await self._stop_handler(handler)  # taken over: the session belongs to the new connection
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)
        if client_session.otad_verdict == Verdict.DEVICE:
            self._events.presence(client_session.username, False)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Send what was queued while the session was offline.

        Defect: amqtt sends these with RETAIN set; they match an established subscription, so
        [MQTT-3.3.1-9] requires RETAIN 0.
        """
        handler = self._get_handler(session)
        if handler is None:
            return
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            # Tracked, not awaited: amqtt waited for every PUBACK before serving the client at all.
            self._send(session, handler, queued.topic, queued.data, queued.qos)

    # --- routing ---

    async def _handle_message_delivery(self, client_session: Session, handler, wait_deliver) -> bool:
        """A client's PUBLISH, routed with its QoS.

        Defect: amqtt broadcasts a client's message without its QoS, so every subscriber got its
        granted QoS; [MQTT-3.8.4-6] delivers at the minimum of the two.
        """
        message = wait_deliver.result()
        if message is None:
            return True
        self._metrics.mqtt_messages_in.inc()
        topic = message.topic
        if not topic or "#" in topic or "+" in topic:
            log.warning("client %s sent a PUBLISH with an invalid topic %r; closing [MQTT-3.3.2-2]",
                        client_session.client_id, topic)
            return False
        if topic.startswith("$"):
            log.warning("client %s may not publish to %r [MQTT-4.7.2-1]", client_session.client_id, topic)
            return True
        if not await self._topic_filtering(client_session, topic, Action.PUBLISH):
            return True  # dropped and logged [MQTT-3.3.5-2]
        # An OTA report was applied before it was acknowledged (OtaProtocolHandler); here it is only routed.
        self._deliver(client_session, topic, message.data, message.qos)
        if message.publish_packet is not None and message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, message.data, message.qos)
        return True

    def _deliver(self, source: Session | None, topic: str, data: bytes, publish_qos: int | None,
                 subscribers: dict[str, tuple[Session, int]] | None = None) -> None:
        """Send one published message to its subscribers (found here unless the caller already
        has them), or queue it for their offline sessions.

        Defects: amqtt scans every subscription filter per message (a fan-out to N devices costs
        N²), overrides the subscriber's QoS with the publisher's, delivers one copy per overlapping
        filter, and queues nothing for anonymous persistent sessions.
        """
        publish_qos = QOS_2 if publish_qos is None else publish_qos
        if subscribers is None:
            subscribers = self._subscribers_of(topic)
        for session, granted_qos in subscribers.values():
            qos = min(publish_qos, granted_qos)
            if not self._policy.may_use(session.otad_verdict, session.username, topic):
                continue
            if session.transitions.state != "connected":
                # 3.1.2.4: a persistent session keeps QoS 1 and 2 messages while it is offline.
                if not session.clean_session and qos in (QOS_1, QOS_2):
                    session.retained_messages.put_nowait(RetainedApplicationMessage(source, topic, data, qos))
                continue
            handler = self._get_handler(session)
            if handler is not None:
                self._send(session, handler, topic, data, qos)

    def _send(self, session: Session, handler, topic: str, data: bytes, qos: int, retain: bool = False) -> None:
        if topic in self._retained_messages:
            session.otad_sent[topic] = data  # so a re-SUBSCRIBE does not get the same command again
        delivery = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=retain))
        self._metrics.mqtt_messages_out.inc()
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._delivery_done)

    def _delivery_done(self, delivery: asyncio.Future) -> None:
        self._deliveries.discard(delivery)
        if not delivery.cancelled() and delivery.exception() is not None:
            log.info("a delivery failed: %s", delivery.exception())

    async def _broadcast_loop(self) -> None:
        """Route client publishes in arrival order.

        amqtt wraps every message in a new task plus an ``asyncio.wait`` on it and a shutdown
        future, which costs more than routing the message through the index does.
        """
        while True:
            broadcast = await self._broadcast_queue.get()
            try:
                self._deliver(broadcast["session"], broadcast["topic"], broadcast["data"], broadcast.get("qos"))
            except Exception:
                log.exception("routing a message on %r failed", broadcast.get("topic"))

    async def _shutdown_broadcast_loop(self) -> None:
        if self._broadcast_task is not None:
            self._broadcast_task.cancel()
            await asyncio.gather(self._broadcast_task, return_exceptions=True)
            self._broadcast_task = None
        for delivery in list(self._deliveries):
            delivery.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def _client_message_loop(self, client_session: Session, handler) -> None:
        """amqtt's per-client loop, less its ``repr`` of every subscription of every client after
        each SUBSCRIBE (evaluated even with debug logging off): a fleet subscribing costs N²."""
        disconnect = asyncio.ensure_future(handler.wait_disconnect())
        subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                done, _ = await asyncio.wait([disconnect, subscribe, unsubscribe, deliver],
                                             return_when=asyncio.FIRST_COMPLETED)
                if disconnect in done:
                    await self._handle_disconnect(client_session, handler, disconnect)
                    break
                if subscribe in done:
                    await self._handle_subscription(client_session, handler, subscribe)
                    subscribe = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe)
                    unsubscribe = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, deliver):
                        break
                    deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        except asyncio.CancelledError:
            pass
        finally:
            waiters = [disconnect, subscribe, unsubscribe, deliver]
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    # --- the service's commands ---

    async def replace_command(self, topic: str, payload: bytes | None, *, send: bool) -> None:
        """Make ``payload`` the one command on ``topic``: drop older copies queued for offline
        sessions, retain it for the next subscriber, and (``send``) deliver it to live subscribers.
        ``payload=None`` clears the command."""
        subscribers = self._subscribers_of(topic)
        for session, _ in subscribers.values():
            _drop_queued(session, topic)
            # Sent but not acknowledged yet: amqtt would re-send it (DUP) when the session comes
            # back, even when connected now (a flaky link drops before the PUBACK). A delivery still
            # waiting for that PUBACK finishes normally without the entry.
            for packet_id in [pid for pid, m in session.inflight_out.items() if m.topic == topic]:
                del session.inflight_out[packet_id]
        await self.retain_message(None, topic, payload or None, QOS_1)
        if payload and send:
            self._deliver(None, topic, payload, QOS_1, subscribers)

    def connected_count(self) -> int:
        return sum(1 for session, _ in self._sessions.values() if session.transitions.state == "connected")

    def is_serving(self) -> bool:
        return self.transitions.state == "started"

    def publish(self, topic: str, payload: bytes, qos: int = QOS_1) -> None:
        """An in-process publish, not retained (replies to devices)."""
        self._deliver(None, topic, payload, qos)

    async def end_sessions_of(self, username: str) -> int:
        """Disconnect and discard every session (live or persistent) logged in as ``username``."""
        ended = [client_id for client_id, (session, _) in self._sessions.items() if session.username == username]
        for client_id in ended:
            await self._cleanup_session(client_id)
        return len(ended)


def _drop_queued(session: Session, topic: str) -> None:
    queue = session.retained_messages
    if queue.empty():
        return
    kept = []
    while not queue.empty():
        message = queue.get_nowait()
        if message.topic != topic:
            kept.append(message)
    for message in kept:
        queue.put_nowait(message)
