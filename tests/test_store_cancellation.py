"""A caller cancelled in the middle of a store write (the daemon's stop cancels its loops, aiohttp
cancels handlers at shutdown) must leave the database usable: CI once hung in a daemon's stop because
a campaign step cancelled while entering a SQLite transaction kept the connection's lock forever."""

import asyncio

from tests.conftest import running_otad, make_settings


async def _cancel_at_every_step(write, rounds: int = 48) -> None:
    """Start ``write()`` and cancel it after 0..7 turns of the loop, round after round: each point
    of entering, running and committing a transaction gets its cancellation."""
    for round_ in range(rounds):
        task = asyncio.ensure_future(write())
        for _ in range(round_ % 8):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_writes_cancelled_midway_leave_the_database_answering(tmp_path):
    async with running_otad(make_settings(tmp_path / "data")) as otad:
        services = otad.daemon.services
        await _cancel_at_every_step(services.health.probe_database)
        # A hang here is the bug: bounded, so it fails instead of hanging the suite.
        await asyncio.wait_for(otad.add_device("gw-after", 7), 10)
        status, body = await asyncio.wait_for(otad.request("GET", "/api/v2/devices"), 10)
        assert status == 200 and [d["deviceName"] for d in body["data"]] == ["gw-after"], body
        await asyncio.wait_for(otad.daemon.stop(), 20)  # and the daemon still stops
