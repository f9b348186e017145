"""Liveness of what the service depends on, and storage that is failing right now."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from otad.store import repo

# The parts /healthz names when they fail.
DATABASE = "database"
FIRMWARE = "firmware"


async def database_alive() -> bool:
    """True when a trivial query answers."""
    return await repo.database_alive()


async def probe_database() -> None:
    """A small write, committed; raises StorageUnavailable while the database cannot take one."""
    await repo.probe_write()


class StorageHealth:
    """Which storage is failing writes, and why (``/healthz`` answers 503 while any is).

    Writers report what happens to them (``failing`` / ``ok``); a failing part is also probed
    (``recheck``), so health comes back by itself when space is freed, even if nobody writes."""

    def __init__(self) -> None:
        self._problems: dict[str, str] = {}
        self._probes: dict[str, Callable[[], Awaitable[None]]] = {}

    def add_probe(self, part: str, probe: Callable[[], Awaitable[None]]) -> None:
        """``probe()`` makes a small durable write to ``part`` and raises if it cannot."""
        self._probes[part] = probe

    def failing(self, part: str, reason: str) -> None:
        self._problems[part] = reason

    def ok(self, part: str) -> None:
        self._problems.pop(part, None)

    def problems(self) -> dict[str, str]:
        return dict(self._problems)

    async def recheck(self) -> dict[str, str]:
        """Probe every failing part once; return what still fails."""
        for part in list(self._problems):
            probe = self._probes.get(part)
            if probe is None:
                continue
            try:
                await probe()
            except Exception as exc:  # still failing: keep the first reason, it names the cause
                self._problems.setdefault(part, str(exc))
            else:
                self.ok(part)
        return self.problems()
