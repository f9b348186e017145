"""otad.cluster on a real PostgreSQL: the leader's advisory lock, NOTIFY between nodes, a session
killed by the server, a dead peer, and an admin command's announcements. (The daemons on top of it:
tests/test_several_nodes.py.)"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from otad.cluster import Announcer, ClusterNode
from tests.postgres import fresh_database, postgres_url  # noqa: F401  (fixture)


class Recorder:
    """What one node heard, its reconnects and its leadership changes."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, object]] = []
        self.reconnects = 0
        self.leading: list[bool] = []
        self.gone: list[str] = []

    def node(self, url: str, name: str) -> ClusterNode:
        return ClusterNode(url, lambda kind, key: self.heard.append((kind, key)), self._reconnected,
                           self.leading.append, name, self.gone.append)

    def _reconnected(self) -> None:
        self.reconnects += 1

    async def started(self, url: str, name: str) -> ClusterNode:
        node = self.node(url, name)
        await node.start()
        return node


async def _until(predicate, timeout: float = 10.0) -> float:
    """Seconds until ``predicate()`` holds; fails after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "not within the time allowed"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def database(postgres_url):  # noqa: F811
    return fresh_database(postgres_url)


async def test_one_node_leads_and_another_takes_over_when_its_session_ends(database):
    first, second = Recorder(), Recorder()
    a, b = await first.started(database, "a"), await second.started(database, "b")
    try:
        assert (a.leading, b.leading) == (True, False)
        assert not await a.alone()
        await a.stop()
        assert await _until(lambda: b.leading) < 3  # the next try, every 2 s
        assert await b.alone()
        assert (first.leading, second.leading) == ([True, False], [True])
    finally:
        await b.stop()


async def test_a_change_reaches_every_other_node_in_order_and_not_its_sender(database):
    recorders = [Recorder() for _ in range(3)]
    nodes = [await recorder.started(database, name) for recorder, name in zip(recorders, "abc")]
    try:
        nodes[0].notify("device-deleted", "gw-1")
        nodes[0].notify("pin", None)
        for recorder in recorders[1:]:
            await _until(lambda: len(recorder.heard) == 2)
            assert recorder.heard == [("device-deleted", "gw-1"), ("pin", None)]
        await asyncio.sleep(0.2)
        assert recorders[0].heard == []
        # More than one NOTIFY payload holds: sent in several, all arrive.
        for index in range(2000):
            nodes[1].notify("upgrades", [[f"v{index}", "gw-1", 1, "notified", "updated", 0]])
        await _until(lambda: len(recorders[2].heard) == 2 + 2000)
        assert recorders[2].heard[-1] == ("upgrades", [["v1999", "gw-1", 1, "notified", "updated", 0]])
    finally:
        for node in nodes:
            await node.stop()


async def test_a_leader_whose_session_is_killed_stops_leading_at_once_and_drops_its_caches_after(database):
    recorder, other = Recorder(), Recorder()
    a = await recorder.started(database, "a")
    b = await other.started(database, "b")
    admin = await asyncpg.connect(database, timeout=10)
    try:
        pid = await admin.fetchval("SELECT pid FROM pg_stat_activity WHERE application_name = 'otad-node a'")
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        assert await _until(lambda: not a.leading, timeout=1) < 0.5
        a.notify("while-away", 1)  # queued while a has no session: sent after the reconnect
        await _until(lambda: b.leading or a.leading)  # someone leads again within a try or two
        await _until(lambda: recorder.reconnects == 1)  # and a, back, drops what it cached
        await _until(lambda: ("while-away", 1) in other.heard)
    finally:
        await admin.close()
        await a.stop()
        await b.stop()


async def test_the_leader_is_told_once_of_a_peer_whose_session_went(database):
    leader, standby = Recorder(), Recorder()
    a = await leader.started(database, "otad-aaaa")
    b = await standby.started(database, "otad-bbbb")
    c = await Recorder().started(database, "otad-cccc")
    try:
        await asyncio.sleep(2.5)  # every node has seen every other
        await c.stop()
        await _until(lambda: leader.gone == ["otad-cccc"], timeout=5)
        assert standby.gone == []  # only the leader acts on it
        await a.stop()  # the leader goes: the standby, now leading, reports it
        await _until(lambda: "otad-aaaa" in standby.gone, timeout=8)
        await asyncio.sleep(2.5)
        # c too (it went a moment before: the standby cannot know that the leader saw to it), once.
        assert sorted(standby.gone) == ["otad-aaaa", "otad-cccc"] and leader.gone == ["otad-cccc"]
    finally:
        await b.stop()


async def test_an_admin_command_announcement_reaches_the_running_nodes(database):
    recorder = Recorder()
    node = await recorder.started(database, "a")
    try:
        announcer = Announcer(database)
        announcer.notify("device-login", "gw-1")
        await announcer.flush()
        await _until(lambda: recorder.heard == [("device-login", "gw-1")], timeout=3)
        await Announcer("postgres://nobody@127.0.0.1:1/none").flush()  # unreachable: logged, not raised
    finally:
        await node.stop()
