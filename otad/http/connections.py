"""The HTTP listener's connections, guarded: a request head must arrive in time, and their number
is capped below what the process's file limit leaves after MQTT and storage.

aiohttp waits forever for a request head: a socket that sends nothing, or trickles its headers,
holds a file descriptor until the process runs out (1,100 such sockets against a limit of 1,024
made MQTT CONNECTs and /healthz fail). Each connection here is aiohttp's own protocol behind a thin
proxy that watches the bytes going in:

- from the first byte of a request (or from the connection's start) the head must be complete,
  up to its blank line, within ``head_timeout``;
- keep-alive connections idle between requests are closed by aiohttp (``keepalive_timeout``);
- at ``max_connections``, the connection idle the longest (no request being handled) is closed to
  make room; when every connection is busy with a request, the newcomer is refused.

A body that stops making progress is the readers' business (``body_timeout`` in the upload and
JSON readers), because only they know when a body ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from aiohttp import web
from aiohttp.web_log import AccessLogger

from otad.metrics import Metrics

log = logging.getLogger(__name__)

_HEAD_END = b"\r\n\r\n"


class ConnectionGuard:
    def __init__(self, max_connections: int, head_timeout: float, metrics: Metrics | None = None) -> None:
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self._metrics = metrics
        self._open: dict[asyncio.BaseTransport, GuardedConnection] = {}
        # Not handling a request, oldest first: keep-alive connections that were served, and new
        # ones still to send their first head. The served go first when room is needed.
        self._served: OrderedDict[GuardedConnection, None] = OrderedDict()
        self._fresh: OrderedDict[GuardedConnection, None] = OrderedDict()

    def factory(self, server: web.Server):
        """The protocol factory for ``loop.create_server``, around aiohttp's."""
        return lambda: GuardedConnection(self, server())

    # --- called by the connections ---

    def admit(self, connection: GuardedConnection) -> bool:
        if len(self._open) >= self.max_connections:
            idle = self._served or self._fresh
            if not idle:
                self._refused("busy")
                return False
            oldest, _ = idle.popitem(last=False)
            self._refused("idle_evicted")
            self.release(oldest)  # its descriptor is freed now (abort), not when the peer reads
            oldest.abort("closed to make room: the connection limit is reached")
        self._open[connection.transport] = connection
        self._fresh[connection] = None
        return True

    def release(self, connection: GuardedConnection) -> None:
        self._open.pop(connection.transport, None)
        self._served.pop(connection, None)
        self._fresh.pop(connection, None)

    def busy(self, connection: GuardedConnection) -> None:
        self._served.pop(connection, None)
        self._fresh.pop(connection, None)

    def idle(self, connection: GuardedConnection) -> None:
        self._fresh.pop(connection, None)
        self._served[connection] = None
        self._served.move_to_end(connection)

    def _refused(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.http_refused.labels(reason).inc()

    # --- called by the request middleware ---

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._open.get(transport) if transport is not None else None
        if connection is not None:
            connection.request_started()

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        connection = self._open.get(transport) if transport is not None else None
        if connection is not None:
            connection.request_finished()


class GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with a head deadline and a place in the guard."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self.transport: asyncio.Transport | None = None
        self._admitted = False
        self._in_request = False  # a request is being handled (head complete)
        self._started = False  # a byte other than CR/LF arrived: a request line has begun
        self._tail = b""  # the last bytes seen while waiting for a head (its end may span chunks)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._guard.admit(self):
            log.warning("HTTP connection from %s refused: %d connections are busy", _peer(transport),
                        self._guard.max_connections)
            transport.abort()  # type: ignore[attr-defined]
            return
        self._admitted = True
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        if not self._in_request:
            if self._deadline is None:
                self._arm()
            if not self._started:
                # Empty lines before a request line are skipped by HTTP parsers [RFC 9112 2.2]:
                # they are not a head, and must not count as one.
                stripped = data.lstrip(b"\r\n")
                if not stripped:
                    self._inner.data_received(data)  # type: ignore[attr-defined]
                    return
                self._started = True
                seen = stripped
            else:
                seen = self._tail + data
            if _HEAD_END in seen:
                self._head_complete()
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._admitted:
            self._admitted = False
            self._guard.release(self)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # --- requests ---

    def request_started(self) -> None:
        self._head_complete()

    def request_finished(self) -> None:
        """The response is sent: the next bytes start a new head (its deadline starts with them)."""
        self._in_request = False
        self._started = False
        self._tail = b""
        self._guard.idle(self)

    def _head_complete(self) -> None:
        self._in_request = True
        self._started = False
        self._tail = b""
        self._disarm()
        self._guard.busy(self)

    # --- the deadline ---

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.head_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_slow(self) -> None:
        self._deadline = None
        if not self._in_request:
            self.abort(f"no complete request head within {self._guard.head_timeout:g} s")

    def close(self, why: str) -> None:
        log.debug("HTTP connection from %s closed: %s", _peer(self.transport), why)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self, why: str) -> None:
        log.debug("HTTP connection from %s aborted: %s", _peer(self.transport), why)
        if self.transport is not None:
            self.transport.abort()


def _peer(transport: asyncio.BaseTransport | None) -> object:
    return transport.get_extra_info("peername") if transport is not None else None


CONNECTIONS = web.AppKey("connections", ConnectionGuard)


class ResponseEndLogger(AccessLogger):
    """aiohttp's access log, which aiohttp calls once a response is completely written: that is
    when a connection becomes idle (a download still being sent is busy, not idle)."""

    @property
    def enabled(self) -> bool:
        return True  # called for every response; the line itself only when INFO is on

    def log(self, request, response, time: float) -> None:
        guard = request.app.get(CONNECTIONS) if isinstance(request, web.Request) else None
        if guard is not None:
            guard.request_finished(request.transport)
        if self.logger.isEnabledFor(logging.INFO):
            super().log(request, response, time)
