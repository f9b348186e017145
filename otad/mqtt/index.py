"""The subscription and retained-message index, as a mixin of ``OtaBroker``.

Defect: amqtt 0.12.1 scans every subscription filter on every publish and every retained message on
every SUBSCRIBE; with one filter and one retained command per device both grow with the fleet, and
a fan-out to N devices costs N². Exact filters are found as keys of amqtt's own subscription dict;
wildcard filters and retained topics are kept in topic tries (``otad.mqtt.topic_index``) beside it.
"""

from __future__ import annotations

from amqtt.mqtt.constants import QOS_2
from amqtt.session import Session

from otad.mqtt.topic_index import TopicTrie


def _is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


class SubscriptionIndex:
    """Overrides amqtt ``Broker`` methods; needs ``_policy`` and ``_send`` from ``OtaBroker``."""

    def _init_index(self) -> None:
        self._wildcard_filters = TopicTrie()  # exact filters are keys of self._subscriptions already
        self._retained_topics = TopicTrie()

    def _subscribers_of(self, topic: str) -> dict[str, tuple[Session, int]]:
        """Each session subscribed to ``topic`` once, with the highest QoS of its matching filters
        (3.3.5). Costs the matching filters, not all of them."""
        found: dict[str, tuple[Session, int]] = {}
        filters = list(self._wildcard_filters.filters_matching(topic))
        if topic in self._subscriptions:
            filters.append(topic)
        for topic_filter in filters:
            for session, qos in self._subscriptions.get(topic_filter, ()):
                known = found.get(session.client_id)
                if known is None or known[1] < qos:
                    found[session.client_id] = (session, qos)
        return found

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt's checks and ACL, then the index; a repeated filter replaces the old QoS.

        Defect: amqtt keeps the first QoS when a client subscribes to the same filter again;
        [MQTT-3.8.4-3] replaces the subscription.
        """
        topic_filter, qos = subscription
        granted = await super().add_subscription(subscription, session)
        if granted == 0x80:
            return granted
        entries = self._subscriptions[topic_filter]
        for index, (subscriber, _) in enumerate(entries):
            if subscriber.client_id == session.client_id:
                entries[index] = (session, granted)
        if _is_wildcard(topic_filter):
            self._wildcard_filters.add(topic_filter)
        if session.otad_filters is None:
            session.otad_filters = set()
        session.otad_filters.add(topic_filter)
        return granted

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        deleted = super()._del_subscription(a_filter, session)
        if a_filter in self._subscriptions and not self._subscriptions[a_filter]:
            del self._subscriptions[a_filter]
            self._wildcard_filters.discard(a_filter)
        if session.otad_filters:
            session.otad_filters.discard(a_filter)
        return deleted

    async def _del_all_subscriptions(self, session: Session) -> None:
        """Defect: amqtt walks every filter of every session for each departing clean session."""
        for topic_filter in list(session.otad_filters or ()):
            self._del_subscription(topic_filter, session)

    # --- retained messages ---

    async def retain_message(self, source_session, topic_name, data, qos=None) -> None:
        await super().retain_message(source_session, topic_name, data, qos)
        if topic_name is not None:
            if topic_name in self._retained_messages:
                self._retained_topics.add(topic_name)
            else:
                self._retained_topics.discard(topic_name)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Session) -> None:
        """Only the retained messages this filter matches, found through the index (amqtt scanned
        them all on every SUBSCRIBE)."""
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None:
            return
        topics = self._retained_topics.topics_matched_by(topic_filter) if _is_wildcard(topic_filter) else (
            [topic_filter] if topic_filter in self._retained_messages else [])
        for topic in list(topics):
            retained = self._retained_messages[topic]
            if session.otad_sent.get(topic) == retained.data:
                continue  # this connection already got it (queued while offline, or live)
            if self._policy.may_use(session.otad_verdict, session.username, topic):
                self._send(session, handler, topic, retained.data,
                           min(qos, QOS_2 if retained.qos is None else retained.qos), retain=True)
