"""amqtt's ``Broker`` with the defects otad depends on fixed (amqtt 0.12.1).

Each override names the defect it fixes; ``tests/test_mqtt_acl.py`` and ``tests/test_offline.py``
fail without them. Access decisions come from our ``AccessPolicy``, not from amqtt plugins, so there
is one place that says who may do what.
"""

from __future__ import annotations

import logging
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action
from amqtt.errors import MQTTError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_1
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from amqtt.utils import gen_client_id

from otad.mqtt.access import AccessPolicy, Verdict

log = logging.getLogger(__name__)

# Attributes otad keeps on amqtt's Session objects.
_VERDICT = "otad_verdict"


class OtaBroker(Broker):
    def __init__(self, config: dict[str, Any], policy: AccessPolicy) -> None:
        super().__init__(config)
        self._policy = policy

    # --- authentication before any session state is touched ---

    async def _initialize_client_session(self, reader, writer, remote_address, remote_port):  # type: ignore[override]
        """Authenticate the CONNECT before amqtt merges it into an existing session.

        Defect: amqtt resolves the client id first (a clean CONNECT deletes the existing session of
        that id, a persistent one takes it over and its queued messages) and only then asks the auth
        plugins; a refused client stays registered as connected. A wrong password could so wipe or
        read another device's session. Here a refused CONNECT gets CONNACK 0x05 and touches nothing,
        and a client id held by one device's session cannot be taken by another device.
        """
        handler, incoming = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        verdict = await self._policy.authenticate(incoming.username, incoming.password)
        existing = self._sessions.get(incoming.client_id or "", (None, None))[0]
        if verdict != Verdict.REFUSED and existing is not None and existing.username != incoming.username:
            log.warning("client id %r belongs to another client's session; refusing %r",
                        incoming.client_id, incoming.username)
            verdict = Verdict.REFUSED
        if verdict == Verdict.REFUSED:
            log.warning("MQTT login refused for %r from %s:%s", incoming.username, remote_address, remote_port)
            await ConnackPacket.build(0, NOT_AUTHORIZED).to_stream(writer)
            await writer.close()
            raise MQTTError("not authorized")

        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
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
        setattr(session, _VERDICT, verdict)
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _authenticate(self, session: Session, _listener: Any) -> bool:
        return getattr(session, _VERDICT, Verdict.REFUSED) != Verdict.REFUSED

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        allowed = self._policy.may_use(getattr(session, _VERDICT, None), session.username, topic)
        if not allowed and action != Action.RECEIVE:
            log.warning("MQTT %s refused: %r may not use %r", action.value, session.username, topic)
        return allowed

    # --- retained messages only for the connecting session's own filters ---

    async def _handle_client_session(self, reader, writer, client_session, handler, server, listener_name):  # type: ignore[override]
        """amqtt's session loop without its retained-message leak.

        Defect: on every CONNECT amqtt publishes the retained messages matching *every* session's
        subscription filters to the new client, unchecked by the topic ACL, so one device received
        another's OTA command. MQTT 3.1.1 sends retained messages on SUBSCRIBE only (3.3.1.3), which
        ``_handle_subscription`` still does after the ACL check; a resumed session gets its queued
        messages instead.
        """
        if not await self._authenticate(client_session, None):
            return
        while True:
            try:
                client_session.transitions.connect()
                break
            except Exception:  # transitions' MachineError: the session is still marked connected
                if client_session.transitions.is_connected():
                    log.info("client %s reconnected: taking over its session", client_session.client_id)
                    _, old_handler = self._sessions[client_session.client_id]
                    await old_handler.handle_connection_closed()
                    await old_handler.stop()
                    break
                raise
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(True)
        await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id,
                                              client_session=client_session)
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        await self._client_message_loop(client_session, handler)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        topic_filter, qos = subscription
        if "+" in topic_filter or "#" in topic_filter:
            await super()._publish_retained_messages_for_subscription(subscription, session)
            return
        # An exact filter needs one lookup, not a scan of every retained message.
        retained = self._retained_messages.get(topic_filter)
        handler = self._get_handler(session)
        if retained is not None and handler is not None:
            await handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos), retain=True)

    # --- the service's commands ---

    async def replace_command(self, topic: str, payload: bytes | None, *, send: bool) -> None:
        """Make ``payload`` the one command on ``topic``: drop older copies queued for offline
        sessions, retain it for the next subscriber, and (``send``) deliver it to live subscribers.
        ``payload=None`` clears the command."""
        for session, _ in self._sessions.values():
            _drop_queued(session, topic)
        if payload is None:
            await self.retain_message(None, topic, None)
            return
        self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, QOS_1)
        if send:
            # qos=None: each subscriber gets min(its granted QoS, QoS 1 of the retained copy) rather
            # than amqtt's forced QoS, which would override a QoS 0 subscription.
            await self.internal_message_broadcast(topic, payload, None)

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
