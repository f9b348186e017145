"""The embedded broker as a daemon component: its listening socket, its lifecycle, and the
``Publisher`` the service uses to reach devices in-process (no loopback MQTT client)."""

from __future__ import annotations

import asyncio
import logging
import socket

from otad.config import MqttSettings
from otad.errors import StartupError
from otad.metrics import Metrics
from otad.mqtt.access import AccessPolicy
from otad.mqtt.broker import Broker, BrokerLimits
from otad.mqtt.connection import MqttConnection
from otad.mqtt.events import DeviceEvents, PresenceHandler, ReportHandler
from otad.mqtt.topics import ota_command_topic, ota_report_reply_topic

log = logging.getLogger(__name__)

_ACCEPTS_PER_TURN = 128
_ACCEPT_QUEUE = 4096


class EmbeddedBroker:
    def __init__(self, settings: MqttSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def start(self, policy: AccessPolicy, on_report: ReportHandler, on_presence: PresenceHandler) -> None:
        settings = self._settings
        limits = BrokerLimits(settings.max_packet_size, settings.max_connections, settings.connect_timeout,
                              settings.session_expiry_interval)
        broker = self._broker = Broker(limits, policy, DeviceEvents(on_report, on_presence, self._reply),
                                       self._metrics, settings)
        try:
            # asyncio uses one number for two things: the kernel's accept queue and how many
            # connections it accepts per event-loop turn. A fleet reconnecting at once (after a
            # gateway reboot) wants a deep queue, or SYNs are dropped and each retry costs a device a
            # second or more; the HTTP API wants small turns. So: accept 128 per turn, then deepen
            # the kernel queue (listen() again on a listening socket only changes the backlog).
            # A TLS listener is the same call with ssl=context: connections only see a transport.
            host = settings.host
            listener = socket.create_server((host, settings.port),
                                            family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            self._server = await asyncio.get_running_loop().create_server(
                lambda: MqttConnection(broker), sock=listener, backlog=_ACCEPTS_PER_TURN)
            listener.listen(_ACCEPT_QUEUE)
        except OSError as exc:
            await broker.stop()
            self._broker = None
            raise StartupError(f"cannot listen for MQTT on {settings.host}:{settings.port}: "
                               f"{exc.strerror or exc}") from None
        log.info("MQTT broker listening on %s:%d", settings.host, self.port)

    def is_serving(self) -> bool:
        return self._broker is not None and self._broker.is_serving() and self._server is not None \
            and self._server.is_serving()

    def _reply(self, device_name: str, payload: bytes) -> None:
        assert self._broker is not None
        # QoS 0: the report it answers is already durable, and a reply only matters to a device
        # that is listening now; no PUBACK to wait for, no copy queued for a device that left.
        self._broker.publish(ota_report_reply_topic(device_name), payload, qos=0)

    async def stop(self) -> None:
        """Stop accepting, end the sessions, then stop (reports not yet applied were not
        acknowledged either: their devices send them again)."""
        if self._server is not None:
            self._server.close()
        if self._broker is not None:
            await self._broker.stop()
        self._broker = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

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
