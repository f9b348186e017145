"""A trie over topic levels, so matching costs the levels of one topic, not the number of filters.

A broker that scans every subscription filter on every publish and every retained message on every
subscribe; with one filter and one retained command per device both grow with the fleet, and a
fan-out to N devices costs N². Two queries over the same structure serve both directions:

- ``filters_matching(topic)``: the stored keys are subscription filters (with ``+``/``#``);
- ``topics_matched_by(filter)``: the stored keys are concrete topics (retained messages).
"""

from __future__ import annotations

from collections.abc import Iterator


class _Node:
    __slots__ = ("children", "key")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = _NO_CHILDREN  # shared until the node gets a child
        self.key: str | None = None  # the stored string that ends at this node


_NO_CHILDREN: dict[str, _Node] = {}  # never written to: add() gives a node its own dict first


class TopicTrie:
    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, key: str) -> None:
        node = self._root
        for level in key.split("/"):
            child = node.children.get(level)
            if child is None:
                if node.children is _NO_CHILDREN:
                    node.children = {}
                child = node.children[level] = _Node()
            node = child
        if node.key is None:
            self._size += 1
        node.key = key

    def discard(self, key: str) -> None:
        path = [self._root]
        for level in key.split("/"):
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        if path[-1].key is None:
            return
        path[-1].key = None
        self._size -= 1
        # Prune the branch so a fleet's departed devices leave no empty nodes behind.
        for level, parent, node in zip(reversed(key.split("/")), reversed(path[:-1]), reversed(path[1:])):
            if node.key is not None or node.children:
                break
            del parent.children[level]

    def filters_matching(self, topic: str) -> Iterator[str]:
        """Stored filters that match ``topic`` (MQTT 3.1.1 section 4.7)."""
        levels = topic.split("/")
        # [MQTT-4.7.2-1] a filter starting with a wildcard does not match a topic starting with "$".
        yield from self._match(self._root, levels, 0, root_wildcards=not topic.startswith("$"))

    def _match(self, node: _Node, levels: list[str], index: int, root_wildcards: bool) -> Iterator[str]:
        wildcards = root_wildcards or index > 0
        if wildcards and (multi := node.children.get("#")) is not None and multi.key is not None:
            yield multi.key  # "#" also matches the parent level: "a/#" matches "a"
        if index == len(levels):
            if node.key is not None:
                yield node.key
            return
        if (child := node.children.get(levels[index])) is not None:
            yield from self._match(child, levels, index + 1, root_wildcards)
        if wildcards and (single := node.children.get("+")) is not None:
            yield from self._match(single, levels, index + 1, root_wildcards)

    def topics_matched_by(self, topic_filter: str) -> Iterator[str]:
        """Stored topics that ``topic_filter`` matches."""
        yield from self._walk(self._root, topic_filter.split("/"), 0)

    def _walk(self, node: _Node, levels: list[str], index: int) -> Iterator[str]:
        if index == len(levels):
            if node.key is not None:
                yield node.key
            return
        level = levels[index]
        skip_dollar = index == 0  # wildcards at the first level never reach "$" topics
        if level == "#":
            for name, child in node.children.items():
                if not (skip_dollar and name.startswith("$")):
                    yield from self._descendants(child)
            if index > 0 and node.key is not None:
                yield node.key  # "a/#" matches "a" itself
        elif level == "+":
            for name, child in node.children.items():
                if not (skip_dollar and name.startswith("$")):
                    yield from self._walk(child, levels, index + 1)
        elif (child := node.children.get(level)) is not None:
            yield from self._walk(child, levels, index + 1)

    def _descendants(self, node: _Node) -> Iterator[str]:
        stack = [node]
        while stack:
            current = stack.pop()
            if current.key is not None:
                yield current.key
            stack.extend(current.children.values())
