"""Deadlines of many connections checked by one periodic sweep instead of a timer each.

A connection is filed under the sweep period its deadline falls in; each sweep looks only at the
periods that have passed, so an idle device costs one check per keepalive period, and a fleet of
them no timer handles at all. Items are never checked early; at most one period late.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class DeadlineWheel(Generic[T]):
    def __init__(self, period: float) -> None:
        self.period = period
        self._buckets: dict[int, list[T]] = {}
        self._cursor: int | None = None  # the last bucket already handed out

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def add(self, deadline: float, item: T) -> None:
        index = int(deadline // self.period) + 1  # the first sweep at or after the deadline
        if self._cursor is not None and index <= self._cursor:
            index = self._cursor + 1
        bucket = self._buckets.get(index)
        if bucket is None:
            self._buckets[index] = [item]
        else:
            bucket.append(item)

    def due(self, now: float) -> Iterator[T]:
        """Every item whose deadline has passed by ``now`` (removed as handed out)."""
        last = int(now // self.period)
        if self._cursor is None:
            self._cursor = min(self._buckets, default=last) - 1
        while self._cursor < last:
            self._cursor += 1
            bucket = self._buckets.pop(self._cursor, None)
            if bucket:
                yield from bucket

    def clear(self) -> None:
        self._buckets.clear()
