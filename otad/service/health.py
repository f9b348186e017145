"""Liveness of what the service depends on, and storage that is failing right now."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable


# The parts /healthz names when they fail.
DATABASE = "database"
FIRMWARE = "firmware"


class StorageHealth:
    """Which storage is failing writes, and why (``/healthz`` answers 503 while any is).

    Writers report what happens to them (``failing`` / ``ok``); a part that no writer has found
    failing for a few seconds is probed (``recheck``), so health comes back by itself when space
    is freed, even if nobody writes. While writers still fail, their word counts, not a probe's
    (a tiny probe may fit where a real write does not)."""

    PROBE_AFTER = 3.0  # seconds without a writer's failure before a probe may clear a part

    def __init__(self, store) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._problems: dict[str, str] = {}
        self._failed_at: dict[str, float] = {}
        self._probes: dict[str, Callable[[], Awaitable[None]]] = {}

    async def database_alive(self) -> bool:
        """True when a trivial query answers."""
        return await self._store.repo.database_alive()

    async def probe_database(self) -> None:
        """A small write, committed; raises StorageUnavailable while the database cannot take one."""
        await self._store.repo.probe_write()

    def add_probe(self, part: str, probe: Callable[[], Awaitable[None]]) -> None:
        """``probe()`` makes a small durable write to ``part`` and raises if it cannot."""
        self._probes[part] = probe

    def failing(self, part: str, reason: str) -> None:
        self._problems[part] = reason
        self._failed_at[part] = time.monotonic()

    def ok(self, part: str) -> None:
        self._problems.pop(part, None)

    def problems(self) -> dict[str, str]:
        return dict(self._problems)

    async def recheck(self) -> dict[str, str]:
        """Probe every failing part once; return what still fails."""
        for part in list(self._problems):
            probe = self._probes.get(part)
            if probe is None or time.monotonic() - self._failed_at.get(part, 0.0) < self.PROBE_AFTER:
                continue
            try:
                await probe()
            except Exception:
                pass  # still failing: keep the writer's reason, it names the cause
            else:
                self.ok(part)
        return self.problems()
