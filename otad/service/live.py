"""What changed in the fleet, for screens that follow it live (the dashboard's event stream).

Changes are collected as they happen (upgrade states, devices coming and going) and summed up at
most once per ``interval`` into one message that every open stream shares: a campaign moving ten
thousand devices is one message a second, not ten thousand, and the work does not grow with the
number of screens. Memory is bounded: at most ``max_items`` changes are kept between messages; past
that the message says "reload" instead of listing them.

Nothing is collected while no stream is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from otad.errors import TooManyRequests
from otad.service.upgrades import UpgradeChange

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0
MAX_ITEMS = 2_000
MAX_STREAMS = 64


@dataclass
class _Pending:
    upgrades: dict[str, dict[str, Any]] = field(default_factory=dict)  # version -> its new state
    devices: dict[str, bool] = field(default_factory=dict)  # name -> online
    campaigns: set[int] = field(default_factory=set)
    overflowed: bool = False

    def __bool__(self) -> bool:
        return bool(self.upgrades or self.devices or self.campaigns or self.overflowed)

    def size(self) -> int:
        return len(self.upgrades) + len(self.devices) + len(self.campaigns)


class LiveStream:
    """One screen's view of the feed: ``next()`` gives each message once, in order."""

    def __init__(self, feed: LiveFeed) -> None:
        self._feed = feed
        self._seen = feed.generation

    async def next(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None after ``timeout`` seconds without one (send a keep-alive).
        A stream that fell behind by more than one message is told to reload instead of being
        handed a gap."""
        generation, message = await self._feed.wait_after(self._seen, timeout)
        if generation == self._seen:
            return None
        missed = generation - self._seen > 1
        self._seen = generation
        return {"reload": True} if missed else message


class LiveFeed:
    """Collects changes and builds the shared message; ``summarise`` adds what the screens show
    beside the changes (counts, campaign progress), read once per message."""

    def __init__(self, summarise: Callable[[set[int]], Awaitable[dict[str, Any]]],
                 interval: float = DEFAULT_INTERVAL, max_items: int = MAX_ITEMS,
                 max_streams: int = MAX_STREAMS) -> None:
        self._summarise = summarise
        self._interval = interval
        self._max_items = max_items
        self._max_streams = max_streams
        self._pending = _Pending()
        self._streams = 0
        self.generation = 0
        self._message: dict[str, Any] = {}
        self._changed: asyncio.Condition | None = None
        self._builder: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    # --- what happened (called by the services; cheap, synchronous) ---

    def upgrades_changed(self, changes: list[UpgradeChange]) -> None:
        if not self._streams:
            return
        pending = self._pending
        for change in changes:
            if pending.size() >= self._max_items:
                pending.overflowed = True
                break
            pending.upgrades[change.version] = {"device": change.device_name, "state": str(change.new),
                                                "campaign": change.campaign_id}
            if change.campaign_id is not None:
                pending.campaigns.add(change.campaign_id)
        self._poke()

    def presence_changed(self, name: str, online: bool) -> None:
        if not self._streams:
            return
        if self._pending.size() >= self._max_items:
            self._pending.overflowed = True
        else:
            self._pending.devices[name] = online
        self._poke()

    def campaign_changed(self, campaign_id: int) -> None:
        """A campaign was paused, resumed, cancelled or moved on: its progress is sent again."""
        if self._streams:
            self._pending.campaigns.add(campaign_id)
            self._poke()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- streams ---

    @contextlib.asynccontextmanager
    async def stream(self) -> AsyncIterator[LiveStream]:
        """Open a stream for the ``async with`` block; TooManyRequests past ``max_streams``."""
        if self._closed:
            raise LiveFeedClosed()
        if self._streams >= self._max_streams:
            raise TooManyRequests(f"失败: {self._max_streams} live views are open; close one", retry_after=10)
        self._streams += 1
        if self._builder is None or self._builder.done():
            self._changed = asyncio.Condition()
            self._wake = asyncio.Event()
            self._builder = asyncio.create_task(self._build(), name="otad-live-feed")
        try:
            yield LiveStream(self)
        finally:
            self._streams -= 1
            if not self._streams and self._builder is not None:
                self._builder.cancel()
                self._builder = None
                self._pending = _Pending()

    async def wait_after(self, generation: int, timeout: float) -> tuple[int, dict[str, Any]]:
        """The newest (generation, message) once the generation passes ``generation``, or the
        current one after ``timeout``. Returns at once when the feed is closed."""
        assert self._changed is not None
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self.generation > generation or self._closed),
                                       timeout)
            if self._closed:
                raise LiveFeedClosed()
            return self.generation, self._message

    def close(self) -> None:
        """The daemon is stopping: every stream's ``next`` ends (LiveFeedClosed)."""
        self._closed = True
        if self._changed is not None and self._builder is not None and not self._builder.done():
            asyncio.create_task(self._notify_all(), name="otad-live-feed-close")

    async def _notify_all(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _build(self) -> None:
        assert self._wake is not None and self._changed is not None
        while True:
            await self._wake.wait()
            started = time.monotonic()
            self._wake.clear()
            pending, self._pending = self._pending, _Pending()
            if pending:
                try:
                    message = await self._message_for(pending)
                except Exception:
                    log.exception("live feed: summing up the changes failed; screens are told to reload")
                    message = {"reload": True}
                async with self._changed:
                    self.generation += 1
                    self._message = message
                    self._changed.notify_all()
            await asyncio.sleep(max(0.0, self._interval - (time.monotonic() - started)))

    async def _message_for(self, pending: _Pending) -> dict[str, Any]:
        if pending.overflowed:
            return {"reload": True, **await self._summarise(pending.campaigns)}
        return {"upgrades": pending.upgrades, "devices": pending.devices, **await self._summarise(pending.campaigns)}


class LiveFeedClosed(Exception):
    """The feed was closed (the daemon is stopping)."""
