"""Who is subscribed to what, and which messages are retained, indexed so that a publish costs the
filters that match its topic and a SUBSCRIBE the retained topics its filter matches, not the size of
the fleet (a fan-out to N devices would otherwise cost N²).

Exact filters are dictionary keys; wildcard filters and retained topics are kept in topic tries
(``otad.mqtt.topic_index``) beside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from otad.mqtt.topic_index import TopicTrie

if TYPE_CHECKING:
    from otad.mqtt.sessions import Session


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class SubscriptionIndex:
    def __init__(self) -> None:
        self._exact: dict[str, dict[Session, int]] = {}
        self._wildcard: dict[str, dict[Session, int]] = {}
        self._wildcard_filters = TopicTrie()

    def add(self, session: Session, topic_filter: str, qos: int) -> None:
        """Subscribe; a repeated filter replaces the old QoS [MQTT-3.8.4-3]."""
        table = self._wildcard if is_wildcard(topic_filter) else self._exact
        subscribers = table.get(topic_filter)
        if subscribers is None:
            subscribers = table[topic_filter] = {}
            if table is self._wildcard:
                self._wildcard_filters.add(topic_filter)
        subscribers[session] = qos
        if session.subscriptions is None:
            session.subscriptions = {}
        session.subscriptions[topic_filter] = qos

    def remove(self, session: Session, topic_filter: str) -> None:
        if session.subscriptions:
            session.subscriptions.pop(topic_filter, None)
            if not session.subscriptions:
                session.subscriptions = None
        wildcard = is_wildcard(topic_filter)
        table = self._wildcard if wildcard else self._exact
        subscribers = table.get(topic_filter)
        if subscribers is None:
            return
        subscribers.pop(session, None)
        if not subscribers:
            del table[topic_filter]
            if wildcard:
                self._wildcard_filters.discard(topic_filter)

    def remove_all(self, session: Session) -> None:
        for topic_filter in list(session.subscriptions or ()):
            self.remove(session, topic_filter)

    def subscribers_of(self, topic: str) -> dict[Session, int]:
        """Each session subscribed to ``topic`` once, with the highest QoS of its matching filters
        (3.3.5). Read-only: it may be the index's own dictionary."""
        exact = self._exact.get(topic)
        if not self._wildcard:
            return exact or {}
        found: dict[Session, int] = dict(exact) if exact else {}
        for topic_filter in self._wildcard_filters.filters_matching(topic):
            for session, qos in self._wildcard[topic_filter].items():
                if found.get(session, -1) < qos:
                    found[session] = qos
        return found


class RetainedMessages:
    """The last retained message of each topic (3.3.1.3), found by filter through a trie."""

    def __init__(self) -> None:
        self._messages: dict[str, tuple[bytes, int]] = {}
        self._topics = TopicTrie()

    def __contains__(self, topic: str) -> bool:
        return topic in self._messages

    def __len__(self) -> int:
        return len(self._messages)

    def get(self, topic: str) -> tuple[bytes, int] | None:
        return self._messages.get(topic)

    def set(self, topic: str, payload: bytes | None, qos: int) -> None:
        """Retain ``payload``; an empty one removes the topic's message [MQTT-3.3.1-10, -11]."""
        if payload:
            if topic not in self._messages:
                self._topics.add(topic)
            self._messages[topic] = (payload, qos)
        elif self._messages.pop(topic, None) is not None:
            self._topics.discard(topic)

    def matching(self, topic_filter: str) -> list[str]:
        if is_wildcard(topic_filter):
            return list(self._topics.topics_matched_by(topic_filter))
        return [topic_filter] if topic_filter in self._messages else []
