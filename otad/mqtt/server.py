"""The embedded broker as a daemon component: its listening socket, its lifecycle, and the
``Publisher`` the service uses to reach devices in-process (no loopback MQTT client)."""

from __future__ import annotations

import asyncio
import logging
import socket

from amqtt.adapters import StreamWriterAdapter

from otad.config import MqttSettings
from otad.errors import StartupError
from otad.metrics import Metrics
from otad.mqtt.access import AccessPolicy
from otad.mqtt.admission import TurnGate
from otad.mqtt.broker import OtaBroker
from otad.mqtt.events import DeviceEvents, PresenceHandler, ReportHandler
from otad.mqtt.topics import ota_command_topic, ota_report_reply_topic
from otad.mqtt.wire import ProtocolRefused, ReplayReader, read_first_packet

log = logging.getLogger(__name__)

_LISTENER = "default"
_HANDSHAKES_PER_TURN = 32  # bench/broker_fanout.py: 16 -> p99 36 ms, 32 -> 63 ms, 64 -> 70 ms; connect time -5..10%
_ACCEPTS_PER_TURN = 128
_ACCEPT_QUEUE = 4096


def broker_config(settings: MqttSettings) -> dict:
    return {
        # We own the TCP socket (see EmbeddedBroker.start) and hand connections to amqtt, so a port
        # in use is our own clear error and the accept path is ours to guard.
        "listeners": {_LISTENER: {"type": "external", "bind": f"{settings.host}:{settings.port}"}},
        "plugins": {},  # access control is OtaBroker + AccessPolicy, not amqtt plugins
        # Sessions of clients that never come back would otherwise accumulate forever.
        "session_expiry_interval": settings.session_expiry_interval,
    }


class EmbeddedBroker:
    def __init__(self, settings: MqttSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._broker: OtaBroker | None = None
        self._events: DeviceEvents | None = None
        self._server: asyncio.Server | None = None
        self._connections = 0
        self._handshakes = TurnGate(_HANDSHAKES_PER_TURN)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self, policy: AccessPolicy, on_report: ReportHandler, on_presence: PresenceHandler) -> None:
        self._events = DeviceEvents(on_report, on_presence, self._reply)
        self._broker = OtaBroker(broker_config(self._settings), policy, self._settings.max_packet_size, self._events,
                                 self._metrics)
        await self._broker.start()
        try:
            # asyncio uses one number for two things: the kernel's accept queue and how many
            # connections it accepts per event-loop turn. A fleet reconnecting at once (after a
            # gateway reboot) wants a deep queue, or SYNs are dropped and each retry costs a device a
            # second or more; the HTTP API wants small turns. So: accept 128 per turn, then deepen
            # the kernel queue (listen() again on a listening socket only changes the backlog).
            host = self._settings.host
            listener = socket.create_server((host, self._settings.port),
                                            family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            self._server = await asyncio.start_server(self._on_connection, sock=listener, backlog=_ACCEPTS_PER_TURN)
            listener.listen(_ACCEPT_QUEUE)
        except OSError as exc:
            await self._broker.shutdown()
            raise StartupError(f"cannot listen for MQTT on {self._settings.host}:{self._settings.port}: "
                               f"{exc.strerror or exc}") from None
        log.info("MQTT broker listening on %s:%d", self._settings.host, self.port)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._broker is not None
        settings = self._settings
        peer = writer.get_extra_info("peername")
        if self._connections >= settings.max_connections:
            # amqtt's own max_connections makes the newcomer wait in a queue, holding its socket.
            log.warning("MQTT connection from %s refused: %d connections is the limit", peer, settings.max_connections)
            self._metrics.mqtt_refused.labels("max_connections").inc()
            writer.close()
            return
        self._connections += 1
        try:
            try:
                first = await asyncio.wait_for(read_first_packet(reader, settings.max_packet_size),
                                               settings.connect_timeout)
            except ProtocolRefused as refused:
                log.warning("MQTT connection from %s refused: %s", peer, refused)
                self._metrics.mqtt_refused.labels("protocol").inc()
                if refused.reply:
                    writer.write(refused.reply)
                    await writer.drain()
                return
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                self._metrics.mqtt_refused.labels("no_connect").inc()
                log.info("MQTT connection from %s closed: no complete CONNECT within %.0f s", peer,
                         settings.connect_timeout)
                return
            await self._handshakes.enter()
            await self._broker.external_connected(ReplayReader(reader, first), StreamWriterAdapter(writer),
                                                  _LISTENER)
        except Exception:
            # One client's failure must never reach asyncio's default handler or other clients.
            log.exception("MQTT connection from %s ended with an error", peer)
        finally:
            self._connections -= 1
            if not writer.is_closing():
                writer.close()

    def is_serving(self) -> bool:
        return self._broker is not None and self._broker.is_serving() and self._server is not None \
            and self._server.is_serving()

    def _reply(self, device_name: str, payload: bytes) -> None:
        assert self._broker is not None
        self._broker.publish(ota_report_reply_topic(device_name), payload)

    async def stop(self) -> None:
        """Stop accepting, end the sessions, then stop (reports not yet applied were not
        acknowledged either: their devices send them again)."""
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            await self._broker.shutdown()
        self._broker = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # --- Publisher ---

    async def send_command(self, device_name: str, payload: bytes) -> None:
        assert self._broker is not None
        await self._broker.replace_command(ota_command_topic(device_name), payload, send=True)

    async def keep_command(self, device_name: str, payload: bytes) -> None:
        assert self._broker is not None
        await self._broker.replace_command(ota_command_topic(device_name), payload, send=False)

    async def clear_command(self, device_name: str) -> None:
        assert self._broker is not None
        await self._broker.replace_command(ota_command_topic(device_name), None, send=False)

    async def forget_device(self, device_name: str) -> None:
        assert self._broker is not None
        await self.clear_command(device_name)
        if ended := await self._broker.end_sessions_of(device_name):
            log.info("device %s deleted: ended %d MQTT session(s)", device_name, ended)
