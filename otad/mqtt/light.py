"""Allocation-frugal stand-ins for ``asyncio.Queue`` and ``asyncio.Event`` inside amqtt's sessions.

amqtt gives every connection four ``asyncio.Queue``s and several ``Event``s. Each Queue holds three
deques and an Event, each Event a deque, and an empty deque costs about 600 bytes: some 12 KB per
idle device, most of what otad keeps per connection (bench/broker_fanout.py). These classes have the
subset of the interface amqtt uses (one consumer per queue, unbounded, no ``join``) and allocate
their storage only while something is in them or someone waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any


class LightQueue:
    __slots__ = ("_items", "_getters")

    def __init__(self) -> None:
        self._items: deque[Any] | None = None
        self._getters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return False

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                break
        if not self._getters:
            self._getters = None

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        if not self._items:
            self._items = None  # an idle queue holds no storage
        return item

    async def get(self) -> Any:
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                if self._getters and getter in self._getters:
                    self._getters.remove(getter)
                if not self._getters:
                    self._getters = None
                raise
        return self.get_nowait()


class LightEvent:
    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters = None

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            if self._waiters and waiter in self._waiters:
                self._waiters.remove(waiter)
