"""Several otad nodes on one PostgreSQL database: which node leads, and telling the others what changed.

Each node keeps one dedicated asyncpg connection of its own, beside tortoise's pool: a session
advisory lock and a LISTEN belong to one session, and a pooled connection is handed from query to
query.

- Leadership: the node whose session holds ``pg_try_advisory_lock(LEADER_KEY)`` runs the campaign
  engine and the timeout sweeper. The others try again every ``RETRY_INTERVAL``. A node that dies
  loses its session, so the lock, at once when its process is killed (the kernel closes its socket)
  and within ``tcp_keepalives_*``/``tcp_user_timeout`` when its host or network goes; another node
  takes it at its next try, within 10 s. A leader that cannot reach its session stops leading at
  once (a ping every ``RETRY_INTERVAL`` bounded by ``PING_TIMEOUT``), before the server gives the
  lock away.
- Changes: ``notify(kind, key)`` sends ``NOTIFY otad_changes`` to every other node (a node does not
  hear its own). What is sent while the connection is down waits and goes after the reconnect; what
  others sent meanwhile is lost, so a reconnect calls ``on_reconnect`` (drop every cache).

With SQLite there is one node: ``SoleNode`` always leads and has nobody to tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from otad.config import redact_url
from otad.errors import StartupError

log = logging.getLogger(__name__)

LEADER_KEY = int.from_bytes(b"otadlead", "big")  # one bigint per database; names what holds it
CHANNEL = "otad_changes"
APPLICATION_NAME = "otad-node"  # how nodes find each other in pg_stat_activity: "otad-node NAME"
RETRY_INTERVAL = 2.0
PING_TIMEOUT = 3.0
CONNECT_TIMEOUT = 5.0
# The server drops a dead peer's session (and its lock) after 4 + 2 * 2 s of silence, or after 8 s
# of unacknowledged data; the node itself notices within RETRY_INTERVAL + PING_TIMEOUT, earlier.
SERVER_SETTINGS = {"tcp_keepalives_idle": "4", "tcp_keepalives_interval": "2", "tcp_keepalives_count": "2",
                   "tcp_user_timeout": "8000"}
_PEERS = ("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE $1 "
          "AND pid <> pg_backend_pid() AND datname = current_database()")
# NOTIFY payloads must stay under 8000 bytes: queued messages are sent in batches below that.
_MAX_PAYLOAD = 7000
# Messages held while the session is down; past that, one RESET stands for them all.
_MAX_OUTBOX = 10_000
RESET = "reset"  # the receivers drop every cached entry
_PEER_MEMORY = 60.0  # seconds a standby remembers a peer that went

Handler = Callable[[str, Any], None]


def is_postgres(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


class Node(Protocol):
    """What the daemon asks of its place among the nodes."""

    @property
    def leading(self) -> bool: ...

    def notify(self, kind: str, key: Any) -> None: ...

    async def alone(self) -> bool: ...


class SoleNode:
    """SQLite: one node, always the leader, nobody to tell."""

    leading = True

    def notify(self, kind: str, key: Any) -> None:
        pass

    async def alone(self) -> bool:
        return True


async def _send(connection: Any, outbox: list[list[Any]]) -> None:
    """Send what is queued, in payloads under the limit; what fails stays queued."""
    while outbox:
        batch: list[list[Any]] = []
        size = 0
        for message in outbox:
            encoded = len(json.dumps(message, separators=(",", ":")))
            if batch and size + encoded > _MAX_PAYLOAD:
                break
            batch.append(message)
            size += encoded + 1
        payload = json.dumps(batch, separators=(",", ":"))
        await connection.execute("SELECT pg_notify($1, $2)", CHANNEL, payload, timeout=PING_TIMEOUT)
        del outbox[:len(batch)]


class Announcer:
    """The node of an admin command (``otad device reset-password``...): it leads nothing and
    hears nothing; what it is told reaches the running nodes when the command ends (``flush``)."""

    leading = False

    def __init__(self, url: str) -> None:
        self._url = url
        self._outbox: list[list[Any]] = []

    def notify(self, kind: str, key: Any) -> None:
        self._outbox.append([kind, key])

    async def alone(self) -> bool:
        return True

    async def flush(self) -> None:
        """Tell the running nodes; a database that cannot be reached is logged, not raised (the
        change itself is committed: the nodes see it at their next read of the entry)."""
        if not self._outbox:
            return
        import asyncpg

        try:
            connection = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT)
            try:
                await _send(connection, self._outbox)
            finally:
                await connection.close(timeout=PING_TIMEOUT)
        except Exception as exc:
            log.warning("could not tell the running otad nodes of %d change(s): %s", len(self._outbox), exc)


class ClusterNode:
    """One node's dedicated session: the leader lock, LISTEN and NOTIFY. ``start`` connects once
    (a StartupError if it cannot), then a task keeps it up; ``stop`` ends the task and the session,
    which releases the lock for another node.

    ``name`` is how the others know this node (its MQTT client id on an external broker). Every
    node watches which peers have a session; the leader calls ``on_peer_gone(name)`` for a peer it
    saw whose session has ended (it died), once."""

    def __init__(self, url: str, on_message: Handler, on_reconnect: Callable[[], None],
                 on_leading: Callable[[bool], None] = lambda leading: None, name: str = "",
                 on_peer_gone: Callable[[str], None] = lambda name: None) -> None:
        self._url = url
        self._name = name
        self._on_peer_gone = on_peer_gone
        # Peer name -> when last seen with a session. A standby forgets a peer gone for a while
        # (the leader dealt with it), and keeps one that went with the leader's death in view.
        self._peers: dict[str, float] = {}
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._on_leading = on_leading
        self._leading = False
        self._connection: Any = None
        self._busy = asyncio.Lock()  # one operation at a time on the connection (asyncpg's rule)
        self._outbox: list[list[Any]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def leading(self) -> bool:
        return self._leading

    def notify(self, kind: str, key: Any) -> None:
        """Tell the other nodes ``kind`` happened to ``key`` (JSON); sent soon, in order."""
        message = [kind, key]
        if len(self._outbox) >= _MAX_OUTBOX or len(json.dumps(message)) > _MAX_PAYLOAD:
            message = [RESET, None]  # cheaper for everyone than a long backlog, and always fits
            self._outbox.clear()
        self._outbox.append(message)
        self._wake.set()

    async def alone(self) -> bool:
        """True when no other otad node has a session on this database now."""
        connection = self._connection
        if connection is None:
            return False
        async with self._busy:
            return not await connection.fetch(_PEERS, f"{APPLICATION_NAME}%", timeout=PING_TIMEOUT)

    async def start(self) -> None:
        try:
            self._connection = await self._connect()
        except Exception as exc:
            raise StartupError(f"cannot open the cluster session on {redact_url(self._url)}: {exc}") from None
        async with self._busy:
            await self._try_lead(self._connection)
        self._task = asyncio.create_task(self._run(), name="otad-cluster")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with contextlib.suppress(Exception):
            async with self._busy:
                await asyncio.wait_for(self._flush(self._connection), PING_TIMEOUT)  # the last changes too
        await self._close()

    async def _connect(self) -> Any:
        import asyncpg  # only nodes on PostgreSQL need it

        connection = await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT, server_settings={
            **SERVER_SETTINGS, "application_name": f"{APPLICATION_NAME} {self._name}"[:63]})
        try:
            await connection.add_listener(CHANNEL, self._heard)
        except BaseException:
            connection.terminate()
            raise
        connection.add_termination_listener(lambda _connection: self._lost())
        return connection

    def _lost(self) -> None:
        """The session is gone: so is the lock, and leading with it, now (not at the next ping)."""
        self._set_leading(False)
        self._wake.set()

    def _set_leading(self, leading: bool) -> None:
        if leading == self._leading:
            return
        self._leading = leading
        if leading:
            log.info("this node now leads: the campaign engine and the timeout sweeper run here")
        else:
            log.warning("this node no longer leads the campaign engine and the timeout sweeper")
        try:
            self._on_leading(leading)
        except Exception:
            log.exception("a leadership listener failed")

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        self._set_leading(False)
        if connection is not None and not connection.is_closed():
            try:
                await asyncio.wait_for(connection.close(), PING_TIMEOUT)
            except Exception:
                connection.terminate()

    async def _try_lead(self, connection: Any) -> None:
        # Also the ping: an answer means the session, and so the lock, is there.
        rows = await connection.fetch(_PEERS, f"{APPLICATION_NAME} _%", timeout=PING_TIMEOUT)
        alive = {row[0].partition(" ")[2] for row in rows}
        if not self._leading and await connection.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_KEY,
                                                           timeout=PING_TIMEOUT):
            self._set_leading(True)
        now = time.monotonic()
        self._peers.update(dict.fromkeys(alive - {self._name}, now))
        if not self._leading:
            self._peers = {name: seen for name, seen in self._peers.items() if now - seen < _PEER_MEMORY}
        else:
            for name in sorted(set(self._peers) - alive):
                del self._peers[name]
                log.warning("node %s has no database session any more: taken as dead", name)
                try:
                    self._on_peer_gone(name)
                except Exception:
                    log.exception("handling the death of node %s failed", name)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._connection is None:
                    self._connection = await self._connect()
                    log.info("cluster session on %s back; dropping cached entries (changes may have been missed)",
                             redact_url(self._url))
                    self._on_reconnect()
                connection = self._connection
                next_check = loop.time()
                while not connection.is_closed():
                    async with self._busy:
                        if loop.time() >= next_check:
                            await self._try_lead(connection)
                            next_check = loop.time() + RETRY_INTERVAL
                        await self._flush(connection)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), max(0.0, next_check - loop.time()))
                    self._wake.clear()
                raise ConnectionError("the session was closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster session on %s lost (%s); reconnecting in %.0f s",
                            redact_url(self._url), exc or type(exc).__name__, RETRY_INTERVAL)
                await self._close()
                await asyncio.sleep(RETRY_INTERVAL)

    async def _flush(self, connection: Any) -> None:
        if connection is not None:
            await _send(connection, self._outbox)

    def _heard(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        if pid == connection.get_server_pid():
            return  # our own
        try:
            messages = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed %s notification from pid %d", channel, pid)
            return
        for kind, key in messages:
            try:
                self._on_message(kind, key)
            except Exception:  # one bad message must not stop the others
                log.exception("handling %s %r from another node failed", kind, key)
