"""MQTT over WebSocket (subprotocol ``mqtt``): binary frames fed into an ``MqttConnection``.

The connection sees a transport-like shim: ``write`` queues bytes that one sender task per socket
sends in order as binary frames, ``pause_reading``/``resume_reading`` stop and restart reading
frames, and the shim calls the protocol's ``pause_writing``/``resume_writing`` when what it holds
(queued, or being sent) passes the high-water mark and falls back under the low one, so flow
control works both ways as over TCP (a chunk request waits for its chunk to drain: docs/chunks.md).
``close`` ends the socket once what was written is sent. MQTT packets may span frames or share
one (MQTT 3.1.1 section 6): the connection parses the byte stream either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

SUBPROTOCOL = "mqtt"
PATHS = ("/mqtt", "/")  # /mqtt is what paho, mqtt.js and mosquitto's clients ask for by default
HIGH_WATER, LOW_WATER = 64 * 1024, 16 * 1024  # asyncio's defaults for a TCP transport


class WebSocketTransport:
    """What ``MqttConnection`` needs of a transport, over one aiohttp WebSocket."""

    def __init__(self, socket: web.WebSocketResponse, underlying: asyncio.BaseTransport | None,
                 protocol: asyncio.Protocol) -> None:
        self._socket = socket
        self._underlying = underlying
        self._protocol = protocol
        self._outgoing = bytearray()
        self._sending = 0  # bytes handed to the socket whose send has not returned yet
        self._writing_paused = False
        self._wake = asyncio.Event()
        self._closing = False
        self.reading = asyncio.Event()
        self.reading.set()

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._outgoing += data
            self._wake.set()
            if not self._writing_paused and self.get_write_buffer_size() > HIGH_WATER:
                self._writing_paused = True
                self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._outgoing) + self._sending

    def _sent(self) -> None:
        self._sending = 0
        if self._writing_paused and self.get_write_buffer_size() <= LOW_WATER:
            self._writing_paused = False
            self._protocol.resume_writing()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._wake.set()
            self.reading.set()  # let the reader see it is closing

    def abort(self) -> None:
        self._outgoing.clear()
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self.reading.clear()

    def resume_reading(self) -> None:
        self.reading.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if self._underlying is None:
            return default
        return self._underlying.get_extra_info(name, default)

    async def send_until_closed(self) -> None:
        """Send what is written, in order, until the connection closes; then close the WebSocket."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._outgoing:
                    data = bytes(self._outgoing)
                    self._outgoing.clear()
                    self._sending = len(data)
                    # Returns once aiohttp's writer drained below its own limit: a peer that does
                    # not read keeps this (and the protocol's writing) waiting.
                    await self._socket.send_bytes(data)
                    self._sent()
                if self._closing and not self._outgoing:
                    break
        except (ConnectionError, RuntimeError) as exc:  # the peer went away mid-send
            log.debug("MQTT WebSocket send failed: %s", exc)
            self._closing = True
            self.reading.set()
        await self._socket.close()


def websocket_app(protocol_factory: Callable[[], asyncio.Protocol], max_frame: int) -> web.Application:
    """An aiohttp application whose WebSocket routes each carry one MQTT connection."""

    async def handle(request: web.Request) -> web.StreamResponse:
        # No compression: inflating frames would cost CPU an MQTT packet never needs.
        socket = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=max_frame, compress=False, timeout=5.0)
        if not socket.can_prepare(request).ok:
            raise web.HTTPBadRequest(text="MQTT over WebSocket: a WebSocket upgrade is expected\n")
        await socket.prepare(request)
        if socket.ws_protocol != SUBPROTOCOL:
            await socket.close(code=1002, message=b"the mqtt subprotocol is required")
            return socket
        await carry(socket, request.transport, protocol_factory())
        return socket

    app = web.Application()
    for path in PATHS:
        app.router.add_get(path, handle)
    return app


async def carry(socket: web.WebSocketResponse, underlying: asyncio.BaseTransport | None,
                protocol: asyncio.Protocol) -> None:
    """Feed ``socket``'s binary frames to ``protocol`` until either side closes."""
    transport = WebSocketTransport(socket, underlying, protocol)
    sender = asyncio.create_task(transport.send_until_closed(), name="otad-mqtt-websocket-send")
    protocol.connection_made(transport)  # type: ignore[arg-type]
    try:
        while True:
            await transport.reading.wait()
            if transport.is_closing():
                break
            message = await socket.receive()
            if message.type == WSMsgType.BINARY:
                protocol.data_received(message.data)
            elif message.type == WSMsgType.TEXT:
                log.warning("MQTT WebSocket client %s sent a text frame; closing",
                            transport.get_extra_info("peername"))
                break
            else:  # CLOSE, CLOSING, CLOSED, ERROR
                break
    finally:
        transport.close()
        try:
            await sender
        finally:
            protocol.connection_lost(None)
