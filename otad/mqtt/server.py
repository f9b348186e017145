"""The embedded broker as a daemon component: its listening socket, its lifecycle, and the
``Publisher`` the service uses to reach devices in-process (no loopback MQTT client)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from aiohttp import web

from otad.config import MqttSettings
from otad.errors import StartupError
from otad.metrics import Metrics
from otad.mqtt.access import AccessPolicy, CertificateLogin
from otad.mqtt.broker import Broker, BrokerLimits
from otad.mqtt.chunks import ChunkServer
from otad.mqtt.connection import MqttConnection
from otad.mqtt.events import DeviceEvents, PresenceHandler, ReportHandler
from otad.mqtt.topics import ota_command_topic, ota_report_reply_topic
from otad.mqtt.websocket import websocket_app
from otad.service.chunks import FirmwareChunks
from otad.tls import verified_common_name

log = logging.getLogger(__name__)

_ACCEPTS_PER_TURN = 128
_ACCEPT_QUEUE = 4096
_WEBSOCKET_SHUTDOWN = 1.0  # seconds for WebSocket handlers after the broker has closed their connections


class _CertificateLogins:
    """The broker as the connections of the client-certificate listener see it: the same broker,
    except that a CONNECT is authenticated by the verified certificate's CN when it carries no
    password (or names another user, which the policy then refuses)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._broker, name)

    def handshake(self, connection: MqttConnection, connect: Any) -> None:
        transport = connection.transport
        name = verified_common_name(transport.get_extra_info("peercert") if transport is not None else None)
        if name is not None:
            if not connect.username:
                connect.username = name
            if connect.password is None or connect.username != name:
                connect.password = CertificateLogin(name)
        self._broker.handshake(connection, connect)


class EmbeddedBroker:
    def __init__(self, settings: MqttSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self._websocket: web.AppRunner | None = None
        self._websocket_socket: socket.socket | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def tls_port(self) -> int | None:
        return self._tls_server.sockets[0].getsockname()[1] if self._tls_server is not None else None

    @property
    def ws_port(self) -> int | None:
        return self._websocket_socket.getsockname()[1] if self._websocket_socket is not None else None

    async def start(self, policy: AccessPolicy, on_report: ReportHandler, on_presence: PresenceHandler,
                    tls: ssl.SSLContext | None = None, chunks: FirmwareChunks | None = None) -> None:
        """Listen on the plain port, and on the TLS and WebSocket ports when configured; serve
        firmware chunks (docs/chunks.md) when ``chunks`` is given."""
        settings = self._settings
        limits = BrokerLimits(settings.max_packet_size, settings.max_connections, settings.connect_timeout,
                              settings.session_expiry_interval)
        broker = self._broker = Broker(limits, policy, DeviceEvents(on_report, on_presence, self._reply),
                                       self._metrics, settings)
        if chunks is not None:
            broker.chunk_server = ChunkServer(broker, chunks)
        port = settings.port
        try:
            self._server = await self._listen(lambda: MqttConnection(broker), port)
            if settings.tls_port and tls is not None:
                port = settings.tls_port
                seen: Any = _CertificateLogins(broker) if tls.verify_mode == ssl.CERT_REQUIRED else broker
                self._tls_server = await self._listen(lambda: MqttConnection(seen), port, tls)
            if settings.ws_port:
                port = settings.ws_port
                await self._start_websocket(lambda: MqttConnection(broker), port)
        except OSError as exc:
            await self.stop()
            raise StartupError(f"cannot listen for MQTT on {settings.host}:{port}: "
                               f"{exc.strerror or exc}") from None
        log.info("MQTT broker listening on %s:%d%s%s", settings.host, self.port,
                 f", TLS on {self.tls_port}" + (" (client certificates required)"
                                                 if tls is not None and tls.verify_mode == ssl.CERT_REQUIRED else "")
                 if self._tls_server else "",
                 f", WebSocket on {self.ws_port}" if self._websocket_socket else "")

    async def _listen(self, factory: Any, port: int, tls: ssl.SSLContext | None = None) -> asyncio.Server:
        # asyncio uses one number for two things: the kernel's accept queue and how many
        # connections it accepts per event-loop turn. A fleet reconnecting at once (after a
        # gateway reboot) wants a deep queue, or SYNs are dropped and each retry costs a device a
        # second or more; the HTTP API wants small turns. So: accept 128 per turn, then deepen
        # the kernel queue (listen() again on a listening socket only changes the backlog).
        # A TLS listener is the same call with ssl=context: connections only see a transport.
        host = self._settings.host
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            server = await asyncio.get_running_loop().create_server(
                factory, sock=listener, backlog=_ACCEPTS_PER_TURN, ssl=tls,
                # A handshake that never finishes is bounded like a CONNECT that never comes.
                ssl_handshake_timeout=self._settings.connect_timeout if tls is not None else None)
        except BaseException:
            listener.close()
            raise
        listener.listen(_ACCEPT_QUEUE)
        return server

    async def _start_websocket(self, factory: Any, port: int) -> None:
        # Frames may be as large as the largest packet (plus its header); the broker checks packets.
        app = websocket_app(factory, self._settings.max_packet_size + 8)
        runner = self._websocket = web.AppRunner(app, shutdown_timeout=_WEBSOCKET_SHUTDOWN, access_log=None,
                                                 handle_signals=False)
        await runner.setup()
        host = self._settings.host
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        backlog=_ACCEPTS_PER_TURN)
        try:
            await web.SockSite(runner, listener, backlog=_ACCEPTS_PER_TURN).start()
        except BaseException:
            listener.close()
            raise
        self._websocket_socket = listener

    def is_serving(self) -> bool:
        return self._broker is not None and self._broker.is_serving() and self._server is not None \
            and self._server.is_serving() and (self._tls_server is None or self._tls_server.is_serving())

    def _reply(self, device_name: str, payload: bytes) -> None:
        assert self._broker is not None
        # QoS 0: the report it answers is already durable, and a reply only matters to a device
        # that is listening now; no PUBACK to wait for, no copy queued for a device that left.
        self._broker.publish(ota_report_reply_topic(device_name), payload, qos=0)

    async def stop(self) -> None:
        """Stop accepting, end the sessions, then stop (reports not yet applied were not
        acknowledged either: their devices send them again)."""
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        for server in servers:
            server.close()
        if self._broker is not None:
            await self._broker.stop()
        self._broker = None
        if self._websocket is not None:
            await self._websocket.cleanup()  # its connections were closed with the broker's
            self._websocket = self._websocket_socket = None
        for server in servers:
            await server.wait_closed()
        self._server = self._tls_server = None

    # --- Publisher ---

    async def send_command(self, device_name: str, payload: bytes) -> None:
        assert self._broker is not None
        self._broker.replace_command(ota_command_topic(device_name), payload, send=True)

    async def keep_command(self, device_name: str, payload: bytes) -> None:
        assert self._broker is not None
        self._broker.replace_command(ota_command_topic(device_name), payload, send=False)

    async def clear_command(self, device_name: str) -> None:
        assert self._broker is not None
        self._broker.replace_command(ota_command_topic(device_name), None, send=False)

    async def forget_device(self, device_name: str) -> None:
        assert self._broker is not None
        await self.clear_command(device_name)
        if ended := self._broker.end_sessions_of(device_name):
            log.info("device %s deleted: ended %d MQTT session(s)", device_name, ended)
