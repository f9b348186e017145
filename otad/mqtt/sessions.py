"""Session state: small objects, their containers allocated only while they hold something.

A session outlives its connection when the client asked for one (CleanSession 0): its
subscriptions, the QoS 1/2 messages sent but not acknowledged (re-sent with DUP on reconnect,
[MQTT-4.4.0-1]) and those queued while it was offline (3.1.2.4). On a gateway of ten thousand idle
devices this is most of what the broker keeps, so every field is a slot and every container starts
as None.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

from otad.mqtt import protocol
from otad.mqtt.access import Verdict
from otad.mqtt.quotas import Quotas, is_command_topic, message_size

if TYPE_CHECKING:
    from otad.mqtt.connection import MqttConnection

SessionKey = tuple[str, str]  # (username or "", client id): one device never reaches another's session

_INFLIGHT_PUBLISH, _INFLIGHT_PUBREL = 0, 1  # awaiting PUBACK/PUBREC, awaiting PUBCOMP
RETAINED = 4  # or-ed into a queued message's QoS: a retained copy held back by a full in-flight window


class Outgoing:
    """One message on its way to many subscribers, encoded once per (QoS, retain) it is sent at;
    only the two bytes of the packet id differ between QoS 1/2 copies. Most fan-outs need one
    variant, kept in a slot; further ones in a small dictionary."""

    __slots__ = ("topic", "payload", "_variant", "_head", "_others")

    def __init__(self, topic: str, payload: bytes) -> None:
        self.topic = topic
        self.payload = payload
        self._variant = -1
        self._head = b""
        self._others: dict[int, bytes] | None = None

    def head(self, qos: int, retain: bool) -> bytes:
        variant = qos << 1 | retain
        if variant == self._variant:
            return self._head
        if self._variant < 0:
            self._variant, self._head = variant, self._encode(qos, retain)
            return self._head
        if self._others is None:
            self._others = {}
        head = self._others.get(variant)
        if head is None:
            head = self._others[variant] = self._encode(qos, retain)
        return head

    def _encode(self, qos: int, retain: bool) -> bytes:
        head = protocol.publish_head(self.topic.encode(), qos, retain, False, len(self.payload))
        # QoS 0: the whole packet is the same for every subscriber.
        return head if qos else head + self.payload


class Session:
    __slots__ = ("key", "username", "verdict", "clean", "subscriptions", "queue", "inflight", "received",
                 "_next_id", "connection", "sent", "disconnected_at", "held_bytes")

    def __init__(self, key: SessionKey, username: str | None, verdict: Verdict, clean: bool) -> None:
        self.key = key
        self.username = username
        self.verdict = verdict
        self.clean = clean
        self.subscriptions: dict[str, int] | None = None  # filter -> granted QoS
        # queued while offline, or while the in-flight window is full: (topic, payload, QoS | RETAINED)
        self.queue: deque[tuple[str, bytes, int]] | None = None
        # packet id -> [topic, payload, qos, stage]: sent, not yet acknowledged (insertion = send order)
        self.inflight: dict[int, list] | None = None
        self.received: set[int] | None = None  # incoming QoS 2 packet ids awaiting their PUBREL
        self._next_id = 0
        self.connection: MqttConnection | None = None
        # command topic -> payload already sent on this connection, so a re-SUBSCRIBE does not get
        # the retained copy of a command the device has (or has in flight) again.
        self.sent: dict[str, bytes] | None = None
        self.disconnected_at = 0.0
        self.held_bytes = 0  # topic and payload bytes queued and in flight (the byte quota's measure)

    @property
    def is_device(self) -> bool:
        return self.verdict == Verdict.DEVICE

    def next_packet_id(self) -> int:
        inflight = self.inflight
        while True:
            self._next_id = self._next_id % 65535 + 1
            if not inflight or self._next_id not in inflight:
                return self._next_id

    def track(self, topic: str, payload: bytes, qos: int) -> int:
        packet_id = self.next_packet_id()
        if self.inflight is None:
            self.inflight = {}
        self.inflight[packet_id] = [topic, payload, qos, _INFLIGHT_PUBLISH]
        self.held_bytes += message_size(topic, payload)
        return packet_id

    def inflight_count(self) -> int:
        return len(self.inflight) if self.inflight else 0

    def acknowledged(self, packet_id: int, qos: int) -> bool:
        """PUBACK (``qos`` 1) or PUBCOMP (``qos`` 2) ends a flow; True when it was one of ours."""
        inflight = self.inflight
        if inflight is None:
            return False
        entry = inflight.get(packet_id)
        if entry is None or entry[2] != qos or entry[3] != (_INFLIGHT_PUBLISH if qos == 1 else _INFLIGHT_PUBREL):
            return False
        del inflight[packet_id]
        self.held_bytes -= message_size(entry[0], entry[1])
        if not inflight:
            self.inflight = None
        return True

    def released(self, packet_id: int) -> bool:
        """PUBREC: the flow moves on to PUBREL/PUBCOMP. True when a PUBREL is due."""
        entry = self.inflight.get(packet_id) if self.inflight else None
        if entry is None or entry[2] != 2:
            return False
        entry[3] = _INFLIGHT_PUBREL
        return True

    def resend_packets(self) -> list[bytes]:
        """What a reconnect re-sends first, in the original order [MQTT-4.4.0-1, MQTT-4.6.0-1]."""
        packets = []
        for packet_id, (topic, payload, qos, stage) in (self.inflight or {}).items():
            if stage == _INFLIGHT_PUBREL:
                packets.append(protocol.ack(protocol.PUBREL, packet_id))
            else:
                packets.append(protocol.publish(topic, payload, qos, packet_id, dup=True))
        return packets

    def forget_topic(self, topic: str) -> None:
        """Drop what is queued or in flight on ``topic`` (a superseded or cleared command)."""
        if self.queue:
            kept = [item for item in self.queue if item[0] != topic]
            self.held_bytes -= sum(message_size(item[0], item[1]) for item in self.queue if item[0] == topic)
            self.queue = deque(kept) if kept else None
        if self.inflight:
            for packet_id in [pid for pid, entry in self.inflight.items() if entry[0] == topic]:
                entry = self.inflight.pop(packet_id)
                self.held_bytes -= message_size(entry[0], entry[1])
            if not self.inflight:
                self.inflight = None

    def enqueue(self, topic: str, payload: bytes, qos: int, quotas: Quotas | None = None) -> int:
        """Queue a message; past the quotas (messages queued; bytes queued and in flight) drop the
        oldest queued one that is not the latest OTA command of its topic, perhaps this one.
        Returns how many were dropped."""
        if self.queue is None:
            self.queue = deque()
        queue = self.queue
        queue.append((topic, payload, qos))
        self.held_bytes += message_size(topic, payload)
        if quotas is None:
            return 0
        dropped = 0
        while (len(queue) > quotas.queued_messages or self.held_bytes > quotas.queued_bytes) and self._drop_oldest():
            dropped += 1
        if not queue:
            self.queue = None
        return dropped

    def _drop_oldest(self) -> bool:
        queue = self.queue
        assert queue is not None
        for index, (topic, payload, _) in enumerate(queue):
            if is_command_topic(topic) and not any(later[0] == topic for later in islice(queue, index + 1, None)):
                continue  # the command a device must get: what the server last said on that topic
            del queue[index]
            self.held_bytes -= message_size(topic, payload)
            return True
        return False

    def next_queued(self) -> tuple[str, bytes, int]:
        """Take the oldest queued message (the queue must not be empty)."""
        queue = self.queue
        assert queue
        item = queue.popleft()
        if not queue:
            self.queue = None
        self.held_bytes -= message_size(item[0], item[1])
        return item

    def received_qos2(self, packet_id: int) -> bool:
        """Note an incoming QoS 2 PUBLISH; False when it is a re-send already routed."""
        if self.received is None:
            self.received = set()
        if packet_id in self.received:
            return False
        self.received.add(packet_id)
        return True

    def release_qos2(self, packet_id: int) -> None:
        if self.received:
            self.received.discard(packet_id)
            if not self.received:
                self.received = None
