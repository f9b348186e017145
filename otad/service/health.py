"""Liveness of what the service depends on."""

from __future__ import annotations

from otad.store import repo


async def database_alive() -> bool:
    """True when a trivial query answers."""
    return await repo.database_alive()
