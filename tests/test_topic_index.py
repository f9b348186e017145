"""The subscription and retained-message index against MQTT 3.1.1 section 4.7 matching rules.

Each case is checked against a brute-force reference so the index can never silently disagree."""

from __future__ import annotations

import random

import pytest

from otad.mqtt.topic_index import TopicTrie


def reference_match(topic: str, topic_filter: str) -> bool:
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    t_levels, f_levels = topic.split("/"), topic_filter.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or level not in ("+", t_levels[i]):
            return False
    return len(t_levels) == len(f_levels)


FILTERS = ["#", "+", "/+", "+/+", "a/#", "a/+", "a/b", "a/b/#", "a/+/c", "+/b/c", "/oc/devices/dev1/#",
           "/oc/devices/+/sys/ota", "/oc/#", "$SYS/#", "$SYS/+", "a//c", "+/+/+", "/oc/devices/dev1/sys/ota"]
TOPICS = ["a", "a/b", "a/b/c", "/a", "/", "", "a//c", "$SYS/load", "$SYS", "/oc/devices/dev1/sys/ota",
          "/oc/devices/dev2/sys/ota", "/oc/devices/dev1", "b/b/c", "a/x/c", "$other/a/b"]


@pytest.mark.parametrize("topic", TOPICS)
def test_filters_matching_agrees_with_the_spec(topic):
    trie = TopicTrie()
    for topic_filter in FILTERS:
        trie.add(topic_filter)
    assert sorted(trie.filters_matching(topic)) == sorted(f for f in FILTERS if reference_match(topic, f))


@pytest.mark.parametrize("topic_filter", FILTERS)
def test_topics_matched_by_agrees_with_the_spec(topic_filter):
    trie = TopicTrie()
    for topic in TOPICS:
        trie.add(topic)
    assert sorted(trie.topics_matched_by(topic_filter)) == sorted(t for t in TOPICS if reference_match(t, topic_filter))


def test_random_fleet_against_reference():
    rng = random.Random(7)
    words = ["a", "b", "oc", "devices", "sys", "ota", "", "$x"]
    topics = {"/".join(rng.choice(words[:-1] if i else words) for i in range(rng.randint(1, 5))) for _ in range(300)}
    filters = set()
    for topic in list(topics)[:150]:
        levels = topic.split("/")
        levels = [rng.choice([level, level, "+"]) for level in levels]
        if rng.random() < 0.3:
            levels = levels[: rng.randint(0, len(levels))] + ["#"]
        filters.add("/".join(levels))
    by_filter, by_topic = TopicTrie(), TopicTrie()
    for f in filters:
        by_filter.add(f)
    for t in topics:
        by_topic.add(t)
    for t in topics:
        assert sorted(by_filter.filters_matching(t)) == sorted(f for f in filters if reference_match(t, f))
    for f in filters:
        assert sorted(by_topic.topics_matched_by(f)) == sorted(t for t in topics if reference_match(t, f))


def test_discard_removes_only_that_key_and_prunes():
    trie = TopicTrie()
    for key in ("a/b", "a/b/c", "a/#", "x/y/z"):
        trie.add(key)
    trie.discard("a/b")
    trie.discard("missing/key")
    assert sorted(trie.filters_matching("a/b")) == ["a/#"]
    assert sorted(trie.filters_matching("a/b/c")) == ["a/#", "a/b/c"]
    trie.discard("x/y/z")
    assert "x" not in trie._root.children  # the empty branch is gone
    assert len(trie) == 2
