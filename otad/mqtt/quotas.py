"""Per-device quotas: how much one authenticated device can make the broker hold.

Without them a single device could fill memory through retained messages on its own topics, its
offline queue, unreleased QoS 2 packet ids or persistent sessions under fresh client ids. Each
quota is a count and, where payloads are kept, a byte bound; the defaults are mosquitto's where
mosquitto has one (``max_queued_messages`` 1000, ``max_inflight_messages`` 20).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from otad.mqtt.topics import DEVICE_ROOT, OTA_COMMAND

if TYPE_CHECKING:
    from otad.config import MqttSettings

_DEVICE_PREFIX = DEVICE_ROOT.split("{device}")[0]
_COMMAND_SUFFIX = OTA_COMMAND.split("{device}")[1]


@dataclass(frozen=True, slots=True)
class Quotas:
    retained_per_device: int = 100
    retained_bytes_per_device: int = 1024**2
    queued_messages: int = 1000  # per session: offline, or waiting for an in-flight slot
    queued_bytes: int = 4 * 1024**2  # per session: queued and in flight together
    inflight: int = 20  # outgoing QoS 1/2 messages unacknowledged per session
    unreleased_qos2: int = 100  # incoming QoS 2 packet ids awaiting their PUBREL
    sessions_per_user: int = 10  # persistent sessions of one username

    @classmethod
    def of(cls, settings: MqttSettings) -> Quotas:
        return cls(settings.max_retained_per_device, settings.max_retained_bytes_per_device,
                   settings.max_queued_messages, settings.max_queued_bytes, settings.max_inflight,
                   settings.max_unreleased_qos2, settings.max_sessions_per_user)


def message_size(topic: str, payload: bytes) -> int:
    """What a kept message is counted as: its topic and payload (what grows with the sender's will)."""
    return len(topic) + len(payload)


def is_command_topic(topic: str) -> bool:
    """A device's OTA command topic, where otad keeps the one current command."""
    if topic.startswith(_DEVICE_PREFIX) and topic.endswith(_COMMAND_SUFFIX):
        name = topic[len(_DEVICE_PREFIX):-len(_COMMAND_SUFFIX)]
        return bool(name) and "/" not in name
    return False


def topic_owner(topic: str) -> str:
    """The device whose quota a retained topic counts against; "" for topics outside every device's
    root (only anonymous lab clients can publish there, and they share one quota)."""
    if topic.startswith(_DEVICE_PREFIX):
        return topic[len(_DEVICE_PREFIX):].split("/", 1)[0]
    return ""


class RetainedUsage:
    """Count and bytes of the retained messages clients left, per device. The command otad itself
    retains on a device's command topic is the server's: never counted, never refused."""

    def __init__(self, quotas: Quotas) -> None:
        self._quotas = quotas
        self._topics: dict[str, tuple[str, int]] = {}  # topic -> (owner, counted bytes)
        self._usage: dict[str, list[int]] = {}  # owner -> [messages, bytes]

    def usage(self, owner: str) -> tuple[int, int]:
        counted = self._usage.get(owner)
        return (counted[0], counted[1]) if counted else (0, 0)

    def admit(self, topic: str, payload: bytes) -> bool:
        """Count a client's retained ``payload`` on ``topic``; False (nothing changed) past the quota."""
        owner, size = topic_owner(topic), message_size(topic, payload)
        count, used = self.usage(owner)
        previous = self._topics.get(topic)
        if previous is not None:  # a replacement: the old message's share is given back
            count, used = count - 1, used - previous[1]
        if count + 1 > self._quotas.retained_per_device or used + size > self._quotas.retained_bytes_per_device:
            return False
        self.forget(topic)
        self._topics[topic] = (owner, size)
        counted = self._usage.setdefault(owner, [0, 0])
        counted[0] += 1
        counted[1] += size
        return True

    def forget(self, topic: str) -> None:
        """The topic's retained message is gone, or is the server's now."""
        previous = self._topics.pop(topic, None)
        if previous is None:
            return
        counted = self._usage[previous[0]]
        counted[0] -= 1
        counted[1] -= previous[1]
        if not counted[0]:
            del self._usage[previous[0]]
