"""otad's MQTT 3.1.1 broker core: sessions, routing, retained messages, wills and deadlines.

Connections (``otad.mqtt.connection``) parse packets and call in here. Access decisions all come
from ``AccessPolicy``: a CONNECT is authenticated before any session state is looked at, sessions
are keyed by (username, client id), and every subscribe, publish, will and delivery is checked
against the device's own topics. Section numbers refer to the OASIS MQTT 3.1.1 standard.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets

from otad.config import MqttSettings
from otad.metrics import Metrics
from otad.mqtt import protocol
from otad.mqtt.access import AccessPolicy, Verdict
from otad.mqtt.admission import TurnGate
from otad.mqtt.chunks import ChunkServer
from otad.mqtt.connection import AUTHENTICATING, OPEN, WAITING, MqttConnection
from otad.mqtt.events import DeviceEvents
from otad.mqtt.index import RetainedMessages, SubscriptionIndex
from otad.mqtt.quotas import Quotas, RetainedUsage, message_size
from otad.mqtt.sessions import RETAINED, Outgoing, Session, SessionKey
from otad.mqtt.sweep import DeadlineWheel
from otad.mqtt.topics import reporting_device

log = logging.getLogger(__name__)

_SWEEP_PERIOD = 0.5  # seconds: how late a CONNECT timeout or keepalive expiry may be noticed
_HANDSHAKES_PER_TURN = 32  # bench/broker_fanout.py: 16 -> p99 36 ms, 32 -> 63 ms, 64 -> 70 ms; connect time -5..10%


class BrokerLimits:
    __slots__ = ("max_packet_size", "max_connections", "connect_timeout", "session_expiry")

    def __init__(self, max_packet_size: int, max_connections: int, connect_timeout: float,
                 session_expiry: float) -> None:
        self.max_packet_size = max_packet_size
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.session_expiry = session_expiry


class Broker:
    def __init__(self, limits: BrokerLimits, policy: AccessPolicy, events: DeviceEvents, metrics: Metrics,
                 settings: MqttSettings | None = None) -> None:
        self.limits = limits
        self.quotas = quotas = Quotas.of(settings) if settings is not None else Quotas()
        self.max_packet_size = limits.max_packet_size
        self.policy = policy
        self.events = events
        self.metrics = metrics
        self._loop = asyncio.get_running_loop()
        self.now = self._loop.time
        self._sessions: dict[SessionKey, Session] = {}
        self._by_user: dict[str, set[Session]] = {}
        self._subscriptions = SubscriptionIndex()
        self._retained = RetainedMessages()
        self._retained_usage = RetainedUsage(quotas)
        self._connections: set[MqttConnection] = set()
        self._connected = 0
        self._handshakes = TurnGate(_HANDSHAKES_PER_TURN)
        self._tasks: set[asyncio.Task] = set()
        # One wheel for CONNECT timeouts (an entry each, checked once), one for keepalives.
        self._connect_deadlines: DeadlineWheel[MqttConnection] = DeadlineWheel(_SWEEP_PERIOD)
        self._keepalive_deadlines: DeadlineWheel[MqttConnection] = DeadlineWheel(_SWEEP_PERIOD)
        # Persistent sessions offline, in the order they went (dicts keep insertion order): the
        # expiry sweep looks at the oldest only, and a reconnect takes a session out in O(1).
        self._offline: dict[Session, None] = {}
        self._sweeper: asyncio.TimerHandle | None = self._loop.call_later(_SWEEP_PERIOD, self._sweep)
        self._serving = True
        self.chunk_server: ChunkServer | None = None  # firmware chunks, when the daemon serves them
        metrics.connected_devices.set_function(self.connected_count)

    # --- connections ---

    def connection_opened(self, connection: MqttConnection) -> bool:
        if not self._serving or len(self._connections) >= self.limits.max_connections:
            # Refused at once: making it wait would hold its socket (and a file descriptor).
            log.warning("MQTT connection from %s refused: %d connections is the limit", connection.peer,
                        self.limits.max_connections)
            self.metrics.mqtt_refused.labels("max_connections").inc()
            return False
        self._connections.add(connection)
        self._connect_deadlines.add(connection.opened_at + self.limits.connect_timeout, connection)
        return True

    def connection_closed(self, connection: MqttConnection) -> None:
        self._connections.discard(connection)

    def refused(self, connection: MqttConnection, reason: str, detail: str) -> None:
        if reason == "no_connect":
            log.info("MQTT connection from %s closed: %s", connection.peer, detail)
        else:
            log.warning("MQTT connection from %s refused: %s", connection.peer, detail)
        self.metrics.mqtt_refused.labels(reason).inc()

    def connected_count(self) -> int:
        return self._connected

    def is_serving(self) -> bool:
        return self._serving

    def handshake(self, connection: MqttConnection, connect: protocol.Connect) -> None:
        self._own(asyncio.ensure_future(self._guarded_handshake(connection, connect)))

    async def _guarded_handshake(self, connection: MqttConnection, connect: protocol.Connect) -> None:
        try:
            await self._handshake(connection, connect)
        except asyncio.CancelledError:
            connection.close()
            raise
        except Exception:
            # One client's failure must never reach asyncio's default handler or other clients.
            log.exception("MQTT connection from %s ended with an error", connection.peer)
            connection.close()

    async def _handshake(self, connection: MqttConnection, connect: protocol.Connect) -> None:
        # Paced: a fleet reconnecting at once must leave the event loop to the HTTP API between slices.
        await self._handshakes.enter()
        if connection.state != AUTHENTICATING:
            return  # closed while it waited
        try:
            verdict = await self.policy.authenticate(connect.username, connect.password)
        except Exception:
            log.exception("authenticating MQTT client %r failed", connect.username)
            verdict = Verdict.REFUSED
        if connection.state != AUTHENTICATING:
            return
        will = connect.will
        if verdict != Verdict.REFUSED and will is not None \
                and not self.policy.may_publish(verdict, connect.username, will.topic):
            # A will is only for the client's own topics: a forged OTA command could be left on
            # another device's topic, or retained on the device's own command topic.
            log.warning("MQTT CONNECT of %r refused: will topic %r is not its own", connect.username, will.topic)
            verdict = Verdict.REFUSED
        if verdict != Verdict.REFUSED and not connect.client_id and not connect.clean_session:
            # [MQTT-3.1.3-8] a persistent session needs an id the client can come back with.
            log.info("MQTT CONNECT of %r refused: an empty client id with CleanSession 0", connect.username)
            self.metrics.mqtt_refused.labels("identifier_rejected").inc()
            connection.write(protocol.connack(protocol.IDENTIFIER_REJECTED))
            connection.discard()
            return
        if verdict == Verdict.REFUSED:
            log.warning("MQTT login refused for %r from %s", connect.username, connection.peer)
            self.metrics.mqtt_refused.labels("not_authorized").inc()
            connection.write(protocol.connack(protocol.NOT_AUTHORIZED))
            connection.discard()
            return
        self._attach(connection, connect, verdict)
        connection.unblock()

    def _attach(self, connection: MqttConnection, connect: protocol.Connect, verdict: Verdict) -> None:
        """Give an authenticated connection its session: new, resumed, or taken over [MQTT-3.1.4-2]."""
        # U+0000 cannot occur in either part [MQTT-1.5.3-2]; a tuple is unambiguous anyway.
        client_id = connect.client_id or f"otad-{secrets.token_hex(8)}"
        key = (connect.username or "", client_id)
        existing = self._sessions.get(key)
        if existing is not None and existing.connection is not None:
            previous = existing.connection
            existing.connection = None
            self._connected -= 1
            previous.discard()  # taken over: the session belongs to the new connection
        if connect.clean_session or existing is None:
            if existing is not None:
                self._discard(existing)
            session = Session(key, connect.username, verdict, connect.clean_session)
            self._sessions[key] = session
            if connect.username:
                self._by_user.setdefault(connect.username, set()).add(session)
            present = False
        else:
            session, present = existing, True
            session.verdict = verdict
            self._offline.pop(session, None)
        session.connection = connection
        self._connected += 1
        if not present and not session.clean and session.username:
            self._bound_sessions(session.username)  # this one is live: never the one to go
        connection.will = connect.will
        if connect.keepalive:
            connection.keepalive = math.ceil(connect.keepalive * 1.5)  # [MQTT-3.1.2-24]
            self._keepalive_deadlines.add(connection.last_received + connection.keepalive, connection)
        connection.opened(session, protocol.connack(protocol.ACCEPTED, present))  # [MQTT-3.2.2-2]
        if session.is_device:
            self.events.presence(session.username, True)  # type: ignore[arg-type]
        # A command sent before the drop and not acknowledged is re-sent below; a re-SUBSCRIBE on
        # this connection must not add the retained copy of the same command.
        session.sent = {entry[0]: entry[1] for entry in session.inflight.values()
                        if entry[0] in self._retained} if session.inflight else None
        # [MQTT-4.4.0-1] re-send what is unacknowledged (DUP), then what was queued while offline
        # [MQTT-4.6.0-6], the latter with RETAIN 0: it matched an established subscription [MQTT-3.3.1-9].
        sent = 0
        for packet in session.resend_packets():
            connection.write(packet)
            sent += 1
        if session.queue:
            for topic, payload, _ in session.queue:
                if topic in self._retained:  # it will be delivered: a re-SUBSCRIBE must not add a copy
                    if session.sent is None:
                        session.sent = {}
                    session.sent[topic] = payload
            sent += self._send_queued(session)
        if sent:
            self.metrics.mqtt_messages_out.inc(sent)

    def detach(self, connection: MqttConnection) -> None:
        """A connection ended: publish its will unless it said DISCONNECT, and end or keep its session."""
        if not connection.take_detach():
            return
        session = connection.session
        if session is None or session.connection is not connection:
            return  # never attached, or taken over / ended meanwhile
        session.connection = None
        session.sent = None
        self._connected -= 1
        will, connection.will = connection.will, None
        if will is not None and self.policy.may_publish(session.verdict, session.username, will.topic):
            self._publish_from(session, will.topic, will.payload, will.qos, will.retain)
        if session.clean:
            self._discard(session)
        else:
            session.disconnected_at = self.now()
            self._offline[session] = None
            if session.username:
                self._bound_sessions(session.username)
        if session.is_device:
            self.events.presence(session.username, False)  # type: ignore[arg-type]

    def _bound_sessions(self, username: str) -> None:
        """At most ``sessions_per_user`` persistent sessions per username: past it, the ones longest
        disconnected go (a live session is never ended for this)."""
        persistent = [session for session in self._by_user.get(username, ()) if not session.clean]
        excess = len(persistent) - self.quotas.sessions_per_user
        if excess <= 0:
            return
        offline = sorted((session for session in persistent if session.connection is None),
                         key=lambda session: session.disconnected_at)
        for session in offline[:excess]:
            self._quota_refused("sessions", "%r: %d persistent sessions is the limit; dropping the one of client %r",
                                username, self.quotas.sessions_per_user, session.key[1])
            self._discard(session)

    def _quota_refused(self, kind: str, message: str, *args: object) -> None:
        # INFO, not WARNING: a device pushing against a quota would otherwise flood the log; the
        # metric shows how often it happens.
        self.metrics.mqtt_quota_refusals.labels(kind).inc()
        log.info("MQTT quota (%s): " + message, kind, *args)

    def admits_qos2(self, session: Session, packet_id: int) -> bool:
        """Whether a new incoming QoS 2 PUBLISH fits the unreleased (no PUBREL yet) quota."""
        received = session.received
        if received is None or packet_id in received or len(received) < self.quotas.unreleased_qos2:
            return True
        self._quota_refused("qos2", "client %r has %d QoS 2 messages unreleased; closing", session.key[1],
                            len(received))
        return False

    def _discard(self, session: Session) -> None:
        self._offline.pop(session, None)
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
        if session.username:
            sessions = self._by_user.get(session.username)
            if sessions is not None:
                sessions.discard(session)
                if not sessions:
                    del self._by_user[session.username]
        self._subscriptions.remove_all(session)

    # --- packets from clients ---

    def report_of(self, session: Session, topic: str) -> str | None:
        """The device whose OTA report a PUBLISH on ``topic`` is, if the session may publish it."""
        device = reporting_device(topic)
        if device is None or not self.policy.may_publish(session.verdict, session.username, topic):
            return None
        return device

    def apply_report(self, connection: MqttConnection, device: str, publish: tuple) -> None:
        task = asyncio.ensure_future(self.events.report(device, publish[4]))
        self._own(task)
        task.add_done_callback(lambda done: self._report_applied(connection, device, publish, done))

    def _report_applied(self, connection: MqttConnection, device: str, publish: tuple, done: asyncio.Future) -> None:
        if done.cancelled() or done.exception() is not None:
            if not done.cancelled():
                log.warning("the report of %s was not applied (%s): closing its connection unacknowledged", device,
                            done.exception())
            connection.close()  # the device sends it again
            return
        try:
            connection.published(*publish)
            connection.unblock()
        except Exception:
            log.exception("MQTT client %s: handling a report failed; closing", connection.describe())
            connection.close()

    def client_publish(self, session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if topic.startswith("$"):
            log.warning("client %r may not publish to %r [MQTT-4.7.2-1]", session.key[1], topic)
            return
        if not self.policy.may_publish(session.verdict, session.username, topic):
            log.warning("MQTT publish refused: %r may not use %r", session.username, topic)
            return  # dropped and logged [MQTT-3.3.5-2]
        self._publish_from(session, topic, payload, qos, retain)

    def _publish_from(self, session: Session | None, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.route(topic, payload, qos)
        if not retain:
            return
        if not payload:
            self._retained_usage.forget(topic)
        elif not self._retained_usage.admit(topic, payload):
            # Still delivered to whoever is subscribed now; only not kept.
            self._quota_refused("retained", "not retaining %d bytes on %r: the device's retained quota is full",
                                len(payload), topic)
            return
        self._retained.set(topic, payload, qos)

    def retained_usage(self, device: str) -> tuple[int, int]:
        """(messages, bytes) retained by clients on ``device``'s topics."""
        return self._retained_usage.usage(device)

    def subscribe(self, connection: MqttConnection, packet_id: int, filters: list[tuple[str, int]]) -> None:
        session = connection.session
        assert session is not None
        codes, granted = [], []
        for topic_filter, qos in filters:
            if not protocol.is_valid_filter(topic_filter) \
                    or not self.policy.may_use(session.verdict, session.username, topic_filter):
                log.warning("MQTT subscribe refused: %r may not use %r", session.username, topic_filter)
                codes.append(protocol.SUBSCRIPTION_REFUSED)
                continue
            self._subscriptions.add(session, topic_filter, qos)
            codes.append(qos)
            granted.append((topic_filter, qos))
        connection.write(protocol.suback(packet_id, codes))
        for topic_filter, qos in granted:
            self._send_retained(session, topic_filter, qos)

    def unsubscribe(self, session: Session, filters: list[str]) -> None:
        for topic_filter in filters:
            self._subscriptions.remove(session, topic_filter)

    def _send_retained(self, session: Session, topic_filter: str, qos: int) -> None:
        """3.3.1.3: the retained messages this filter matches, on SUBSCRIBE only, with RETAIN 1."""
        sent = 0
        for topic in self._retained.matching(topic_filter):
            retained = self._retained.get(topic)
            if retained is None or session.connection is None:
                continue
            payload, retained_qos = retained
            if session.sent is not None and session.sent.get(topic) == payload:
                continue  # this connection already got it (queued while offline, or live)
            if self.policy.may_use(session.verdict, session.username, topic):
                sent += self._send(session, Outgoing(topic, payload), min(qos, retained_qos), True)
        if sent:
            self.metrics.mqtt_messages_out.inc(sent)

    # --- routing ---

    def route(self, topic: str, payload: bytes, qos: int, subscribers: dict[Session, int] | None = None) -> None:
        """Send one message to each subscriber once, at the lower of its QoS and the subscription's
        [MQTT-3.8.4-6], or queue it for offline persistent sessions (QoS 1 and 2, 3.1.2.4)."""
        if subscribers is None:
            subscribers = self._subscriptions.subscribers_of(topic)
        if not subscribers:
            return
        message = Outgoing(topic, payload)
        may_use = self.policy.may_use
        sent = 0
        for session, granted in subscribers.items():
            if not may_use(session.verdict, session.username, topic):
                continue
            delivered_qos = granted if granted < qos else qos
            if session.connection is None:
                if not session.clean and delivered_qos:
                    self._enqueue(session, topic, payload, delivered_qos)
                continue
            sent += self._send(session, message, delivered_qos, False)
        if sent:
            self.metrics.mqtt_messages_out.inc(sent)

    def _send(self, session: Session, message: Outgoing, qos: int, retain: bool) -> int:
        """Send now, or (QoS 1/2) queue behind a full in-flight window, what is already queued, or the
        session's byte quota; returns how many packets went out."""
        connection = session.connection
        assert connection is not None
        if message.topic in self._retained:
            if session.sent is None:
                session.sent = {}
            session.sent[message.topic] = message.payload  # so a re-SUBSCRIBE does not get it again
        if not qos:
            connection.write(message.head(0, retain))
            return 1
        quotas = self.quotas
        if session.queue or session.inflight_count() >= quotas.inflight \
                or session.held_bytes + message_size(message.topic, message.payload) > quotas.queued_bytes:
            if not session.queue and session.inflight_count() >= quotas.inflight:
                self.metrics.mqtt_quota_refusals.labels("inflight").inc()  # held back, not dropped
            self._enqueue(session, message.topic, message.payload, qos | (RETAINED if retain else 0))
            return self._send_queued(session)
        packet_id = session.track(message.topic, message.payload, qos)
        connection.write(message.head(qos, retain) + protocol.packet_id_bytes(packet_id) + message.payload)
        return 1

    def _enqueue(self, session: Session, topic: str, payload: bytes, qos: int) -> None:
        dropped = session.enqueue(topic, payload, qos, self.quotas)
        if dropped:
            self.metrics.mqtt_quota_refusals.labels("queue").inc(dropped)
            log.info("MQTT quota (queue): client %r: %d queued message(s) dropped, the oldest first",
                     session.key[1], dropped)

    def _send_queued(self, session: Session) -> int:
        """Send queued messages, oldest first, while the in-flight window has room."""
        connection, sent = session.connection, 0
        while connection is not None and session.queue and session.inflight_count() < self.quotas.inflight:
            topic, payload, flags = session.next_queued()
            qos, retain = flags & 3, bool(flags & RETAINED)
            packet_id = session.track(topic, payload, qos)
            connection.write(protocol.publish(topic, payload, qos, packet_id, retain=retain))
            sent += 1
        return sent

    def acknowledged(self, session: Session) -> None:
        """A PUBACK or PUBCOMP freed an in-flight slot: what waited for one goes out."""
        if session.queue and (sent := self._send_queued(session)):
            self.metrics.mqtt_messages_out.inc(sent)

    # --- the service's commands ---

    def replace_command(self, topic: str, payload: bytes | None, *, send: bool) -> None:
        """Make ``payload`` the one command on ``topic``: drop older copies queued for offline
        sessions or in flight (a re-send on reconnect would deliver a superseded or cancelled
        command), retain it for the next subscriber, and (``send``) deliver it to live subscribers.
        ``payload=None`` clears the command."""
        subscribers = self._subscriptions.subscribers_of(topic)
        for session in subscribers:
            session.forget_topic(topic)
        self._retained_usage.forget(topic)  # the server's now: never counted against the device
        self._retained.set(topic, payload, 1)
        if payload and send:
            self.route(topic, payload, 1, subscribers)
        for session in subscribers:  # slots the forgotten copies held are free again
            if session.connection is not None and session.queue:
                self.acknowledged(session)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """An in-process publish, not retained (replies to devices)."""
        self.route(topic, payload, qos)

    def reply(self, connection: MqttConnection, topic: str, payload: bytes, qos: int) -> None:
        """Send ``payload`` to the session of ``connection`` alone, if it subscribes to ``topic``
        and still has that connection: the answer to its own request. Another connection of the
        same device subscribed to ``topic`` gets nothing, so one that never reads cannot make otad
        hold a copy of every answer (docs/chunks.md)."""
        session = connection.session
        if session is None or session.connection is not connection:
            return
        granted = self._subscriptions.subscribers_of(topic).get(session)
        if granted is not None:
            self.route(topic, payload, qos, {session: granted})

    def end_sessions_of(self, username: str) -> int:
        """Disconnect and discard every session (live or persistent) logged in as ``username``."""
        sessions = list(self._by_user.get(username, ()))
        for session in sessions:
            connection = session.connection
            if connection is not None:
                session.connection = None
                self._connected -= 1
                connection.discard()
            self._discard(session)
        return len(sessions)

    # --- deadlines ---

    def _sweep(self) -> None:
        now = self.now()
        try:
            for connection in self._connect_deadlines.due(now):
                self._check_connect(connection, now)
            for connection in self._keepalive_deadlines.due(now):
                self._check_keepalive(connection, now)
            self._expire_sessions(now)
        except Exception:
            log.exception("the MQTT sweep failed")
        if self._serving:
            self._sweeper = self._loop.call_later(_SWEEP_PERIOD, self._sweep)

    def _check_connect(self, connection: MqttConnection, now: float) -> None:
        if connection.state == WAITING:
            self.refused(connection, "no_connect", f"no complete CONNECT within {self.limits.connect_timeout:.0f} s")
            connection.discard()

    def _check_keepalive(self, connection: MqttConnection, now: float) -> None:
        if connection.state == OPEN and connection.keepalive:
            if connection.blocked:
                # Waiting on us (a report being committed), not on the client.
                self._keepalive_deadlines.add(now + connection.keepalive, connection)
                return
            deadline = connection.last_received + connection.keepalive
            if now >= deadline:
                log.info("MQTT client %s sent nothing for 1.5 x its keepalive: closing [MQTT-3.1.2-24]",
                         connection.describe())
                connection.close()  # the will goes out, as for any connection lost without DISCONNECT
            else:
                self._keepalive_deadlines.add(deadline, connection)

    def _expire_sessions(self, now: float) -> None:
        expiry, offline = self.limits.session_expiry, self._offline
        while offline:
            oldest = next(iter(offline))
            if oldest.disconnected_at + expiry > now:
                break
            self._discard(oldest)  # a client that never came back (also takes it out of offline)

    # --- lifecycle ---

    def spawn(self, coroutine) -> None:
        """Run ``coroutine`` as a task the broker owns (cancelled at stop)."""
        self._own(asyncio.ensure_future(coroutine))

    def _own(self, task: asyncio.Future) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Close every connection (their departures noted) and stop; reports not yet applied are
        not acknowledged either: their devices send them again."""
        self._serving = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for connection in list(self._connections):
            connection.will = None
            connection.close()
        await asyncio.sleep(0)  # let the transports report their ends
        self._connect_deadlines.clear()
        self._keepalive_deadlines.clear()
        self._offline.clear()
