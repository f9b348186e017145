"""mqtt.mode = external: otad as a client of an external broker, behind the same ``Publisher`` port
as the embedded broker (``otad.mqtt.server``).

The promises of the embedded mode, kept over a broker otad does not own:

- a device's OTA command is published QoS 1 *retained* on its command topic, so a device that
  subscribes later (or reconnects) gets it from the broker; an upgrade that ends publishes an empty
  retained message, which clears it;
- reports arrive through the shared subscription ``$share/otad//oc/devices/+/sys/ota/report``, so
  each is applied by one otad node; a report is acknowledged (PUBACK) only once it is committed;
- firmware chunk requests (docs/chunks.md) arrive through ``$share/otad//oc/devices/+/sys/ota/chunk/request``
  at QoS 0 (a request made while otad is away is not served later: the device asks again), and each
  chunk is published on the device's response topic at QoS 1, so the next one waits for the broker;
- otad's session is persistent (CleanSession 0, one stable client id per node): a report the broker
  sent but otad never acknowledged, or one sent while otad was away, is delivered again on the
  next connection, and nothing is lost across a broker or otad restart;
- commands published while disconnected wait (the latest per device: a newer command replaces an
  older one, so the queue is bounded by the fleet) and go out after reconnecting; those the broker
  had not acknowledged when the connection ended are sent again.

Presence is not known in this mode: the broker, not otad, sees devices connect (best effort: none).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from otad.config import MqttSettings
from otad.errors import StartupError
from otad.mqtt.client import BrokerAddress, ClientConnection, ConnectRefused, Message
from otad.mqtt.chunks import frame
from otad.mqtt.events import ReportHandler
from otad.mqtt.topics import (OTA_CHUNK_REQUEST, OTA_REPORT, chunk_requesting_device, ota_chunk_response_topic,
                              ota_command_topic, ota_report_reply_topic, reporting_device)
from otad.service.chunks import FirmwareChunks

log = logging.getLogger(__name__)
T = TypeVar("T")

# The empty level after the group: otad's topics start with "/".
REPORT_SUBSCRIPTION = "$share/otad/" + OTA_REPORT.format(device="+")
CHUNK_SUBSCRIPTION = "$share/otad/" + OTA_CHUNK_REQUEST.format(device="+")
KEEPALIVE = 30
_FIRST_BACKOFF, _MAX_BACKOFF = 0.5, 30.0
_MAX_REPORT_FAILURES = 3  # a report that cannot be applied this often is dropped, or it would stall the rest
_NODE_ID_FILE = "node-id"


def node_client_id(data_dir: Path) -> str:
    """otad's client id on the external broker: stable per node (kept in the data directory), so
    its persistent session survives otad's restarts; distinct per node, so nodes do not evict each
    other."""
    path = data_dir / _NODE_ID_FILE
    try:
        node = path.read_text().strip()
    except FileNotFoundError:
        node = ""
    if not node:
        node = uuid.uuid4().hex[:16]
        path.write_text(node + "\n")
    return f"otad-{node}"


class ExternalBroker:
    """otad's client of the external broker; implements ``Publisher``."""

    def __init__(self, settings: MqttSettings, data_dir: Path) -> None:
        self._address = BrokerAddress.from_url(settings.external_url)
        self._data_dir = data_dir
        self.client_id = ""  # known at start, from the data directory
        self._timeout = settings.connect_timeout
        self._on_report: ReportHandler | None = None
        self._on_session_lost: Callable[[], Awaitable[object]] | None = None
        self._chunks: FirmwareChunks | None = None
        self._sessions = 0  # connections made; the first one's new session is the daemon's to fill
        # Reports flow unless the open upgrades' commands are being published again (without_reports).
        self._reports_open = asyncio.Event()
        self._reports_open.set()
        self._holds = 0
        self._applying = 0  # reports being applied now
        self._idle = asyncio.Event()
        self._idle.set()
        self._connection: ClientConnection | None = None
        self._runner: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._seq = itertools.count(1)
        # topic -> (sequence, payload): commands the broker has not acknowledged yet.
        self._commands: dict[str, tuple[int, bytes]] = {}
        self._failures: dict[bytes, int] = {}  # report digest -> failed applications
        self.connected = asyncio.Event()

    # The embedded broker's listening ports: none in this mode.
    port = tls_port = ws_port = None

    @property
    def pending_commands(self) -> int:
        return len(self._commands)

    async def start(self, on_report: ReportHandler,
                    on_session_lost: Callable[[], Awaitable[object]] | None = None,
                    chunks: FirmwareChunks | None = None) -> None:
        """Connect once (bounded by mqtt.connect_timeout), then stay connected in the background.
        A broker that refuses otad's account is a StartupError; one that is unreachable is retried
        with backoff while the rest of otad runs. ``on_session_lost`` runs when a reconnect finds
        that the broker forgot otad's session (it crashed before saving, or lost its disk): its
        retained commands may be gone too, so the daemon publishes the open upgrades' again.
        ``chunks``: serve firmware chunk requests too."""
        self._on_report = on_report
        self._on_session_lost = on_session_lost
        self._chunks = chunks
        self.client_id = node_client_id(self._data_dir)
        try:
            await self._connect()
        except ConnectRefused as exc:
            if exc.is_permanent:
                raise StartupError(f"mqtt.external_url {self._address.describe()}: {exc}") from None
            log.warning("MQTT broker %s: %s; retrying", self._address.describe(), exc)
        except (OSError, TimeoutError) as exc:
            log.warning("cannot reach the MQTT broker %s (%s); retrying in the background",
                        self._address.describe(), exc or type(exc).__name__)
        self._runner = asyncio.create_task(self._stay_connected(), name="otad-mqtt-external")

    async def _connect(self) -> None:
        connection = await ClientConnection.open(self._address, self.client_id, clean_session=False,
                                                 keepalive=KEEPALIVE, on_message=self._received,
                                                 timeout=self._timeout)
        # Every time, session or not: cheap, and a broker that lost its state still gets it.
        if not await self._subscribe(connection, REPORT_SUBSCRIPTION, 1):
            connection.abort()
            raise StartupError(f"the MQTT broker {self._address.describe()} refused otad's subscription "
                               f"{REPORT_SUBSCRIPTION} (the account's ACL must allow it)")
        # A broker whose ACL predates chunks refuses this one: reports and commands still work.
        if self._chunks is not None and not await self._subscribe(connection, CHUNK_SUBSCRIPTION, 0):
            log.warning("the MQTT broker %s refused otad's subscription %s: no firmware over MQTT (the account's "
                        "ACL must allow it: docs/chunks.md)", self._address.describe(), CHUNK_SUBSCRIPTION)
        self._connection = connection
        self.connected.set()
        log.info("connected to the MQTT broker %s as %s (session %s); %d command(s) to send",
                 self._address.describe(), self.client_id,
                 "resumed" if connection.session_present else "new", len(self._commands))
        for topic, (seq, payload) in list(self._commands.items()):
            self._spawn(self._deliver(connection, topic, seq, payload))
        self._sessions += 1
        if not connection.session_present and self._sessions > 1 and self._on_session_lost is not None:
            log.warning("the MQTT broker %s lost otad's session: publishing the open upgrades' commands again",
                        self._address.describe())
            self._spawn(self._session_lost(self._on_session_lost))

    async def _subscribe(self, connection: ClientConnection, topic: str, qos: int) -> bool:
        """Subscribe within the connect timeout (aborting the connection if it fails); False: refused."""
        try:
            codes = await asyncio.wait_for(connection.subscribe([(topic, qos)]), self._timeout)
        except BaseException:
            connection.abort()
            raise
        return codes[0] != 0x80

    async def _session_lost(self, restore: Callable[[], Awaitable[object]]) -> None:
        try:
            await self.without_reports(restore)
        except Exception:
            log.exception("publishing the open upgrades' commands again failed")

    async def without_reports(self, action: Callable[[], Awaitable[T]]) -> T:
        """Run ``action`` (publishing the open upgrades' commands again) while no report is being
        applied: one applied between its reading the open upgrades and its publishing their commands
        would have its upgrade's command cleared, then published again, retained, for good. Reports
        that arrive meanwhile wait, unacknowledged."""
        self._holds += 1
        self._reports_open.clear()
        try:
            try:
                await asyncio.wait_for(self._idle.wait(), self._timeout)
            except TimeoutError:
                log.warning("reports still being applied after %.0f s; restoring the commands anyway", self._timeout)
            return await action()
        finally:
            self._holds -= 1
            if not self._holds:
                self._reports_open.set()

    async def _stay_connected(self) -> None:
        backoff = _FIRST_BACKOFF
        while True:
            if self._connection is not None:
                await self._connection.closed
                self._connection = None
                self.connected.clear()
                log.warning("lost the connection to the MQTT broker %s; reconnecting", self._address.describe())
                backoff = _FIRST_BACKOFF
            # Jittered, so that several nodes do not reconnect in step after a broker restart.
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            try:
                await self._connect()
            except (OSError, TimeoutError, ConnectRefused, StartupError) as exc:
                log.warning("MQTT broker %s: %s; next attempt in %.0f s", self._address.describe(),
                            exc or type(exc).__name__, backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def is_serving(self) -> bool:
        """True while otad keeps (or keeps trying to get) its connection to the broker; a broker that
        is down is not a reason for systemd to restart otad."""
        return self._runner is not None and not self._runner.done()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- reports ---

    def _received(self, message: Message) -> None:
        device = reporting_device(message.topic)
        if device is None and self._chunks is not None \
                and (requester := chunk_requesting_device(message.topic)) is not None:
            self._spawn(self._chunk(requester, message))
            return
        if device is None:
            log.warning("a message on %s is not a device report; dropped", message.topic)
            message.ack()
            return
        self._spawn(self._report(device, message))

    async def _report(self, device: str, message: Message) -> None:
        assert self._on_report is not None
        connection = message.connection
        await self._reports_open.wait()
        self._applying += 1
        self._idle.clear()
        try:
            reply = await self._on_report(device, message.payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._given_up(device, message.payload):
                log.error("the report of %s failed %d times (%r); acknowledged and dropped", device,
                          _MAX_REPORT_FAILURES, exc)
            else:
                # Unacknowledged, it is held for this session: a new connection gets it again.
                log.warning("the report of %s was not applied (%r): reconnecting to have it again", device, exc)
                connection.abort()
                return
        else:
            if reply is not None and connection.is_open:
                # QoS 0, as in embedded mode: the report is already durable.
                await connection.publish(ota_report_reply_topic(device), reply, qos=0)
        finally:
            self._applying -= 1
            if not self._applying:
                self._idle.set()
        message.ack()

    async def _chunk(self, device: str, message: Message) -> None:
        """Answer one chunk request; its transfer slot is held until the broker took the chunk."""
        assert self._chunks is not None
        connection = message.connection
        try:
            async with self._chunks.transfer(device, message.payload) as reply:
                if not reply.data and connection.congested:
                    # The broker is not taking what otad writes: a flood of refusals (busy, say)
                    # would only grow otad's buffer. Dropped; the device times out and asks again.
                    log.debug("chunk refusal for %s dropped: the broker connection is congested", device)
                elif connection.is_open:
                    await connection.publish(ota_chunk_response_topic(device), frame(reply),
                                             qos=1 if reply.data else 0)
        except ConnectionError:
            pass  # the device asks again
        finally:
            message.ack()

    def _given_up(self, device: str, payload: bytes) -> bool:
        key = hashlib.sha256(device.encode() + b"\0" + payload).digest()
        count = self._failures.get(key, 0) + 1
        if count >= _MAX_REPORT_FAILURES:
            self._failures.pop(key, None)
            return True
        if len(self._failures) > 1000:
            self._failures.clear()
        self._failures[key] = count
        return False

    # --- Publisher ---

    def _command(self, device_name: str, payload: bytes) -> None:
        topic = ota_command_topic(device_name)
        seq = next(self._seq)
        self._commands[topic] = (seq, payload)
        connection = self._connection
        if connection is not None and connection.is_open:
            self._spawn(self._deliver(connection, topic, seq, payload))

    async def _deliver(self, connection: ClientConnection, topic: str, seq: int, payload: bytes) -> None:
        try:
            await connection.publish(topic, payload, qos=1, retain=True)
        except ConnectionError:
            return  # still queued: sent again on the next connection
        if self._commands.get(topic, (0,))[0] == seq:
            del self._commands[topic]

    async def send_command(self, device_name: str, payload: bytes) -> None:
        self._command(device_name, payload)

    async def keep_command(self, device_name: str, payload: bytes) -> None:
        # The broker retains it; publishing it again at start restores one that never reached the
        # broker (otad stopped before the PUBACK), at worst a duplicate, which QoS 1 allows anyway.
        self._command(device_name, payload)

    async def clear_command(self, device_name: str) -> None:
        self._command(device_name, b"")  # an empty retained message deletes the retained one

    async def forget_device(self, device_name: str) -> None:
        # Its broker account is removed by the provisioning (mosquitto-dynsec), which also ends its sessions.
        await self.clear_command(device_name)

    async def retire_session(self, client_id: str, quiet: float = 1.0, longest: float = 5.0) -> int:
        """Another otad node died (otad.cluster saw its database session end): take its broker
        session over, apply the reports queued for it, then end the session. mosquitto keeps giving
        an offline persistent member its share of the shared subscription (queued, or dropped at
        QoS 0), so without this every other report would wait for the dead node's return. Returns
        how many queued reports were applied. A node that comes back makes a new session.

        Drained until ``quiet`` seconds pass without a report, or ``longest`` in all: the session
        still gets its live share meanwhile, so under load it is never quiet."""
        loop = asyncio.get_running_loop()
        heard = [0, loop.time()]
        deadline = loop.time() + longest

        def received(message: Message) -> None:
            heard[0] += 1
            heard[1] = loop.time()
            self._received(message)

        connection = await ClientConnection.open(self._address, client_id, clean_session=False, keepalive=KEEPALIVE,
                                                 on_message=received, timeout=self._timeout)
        try:
            while connection.session_present and loop.time() - heard[1] < quiet and loop.time() < deadline:
                await asyncio.sleep(0.1)
            if self._tasks:  # the reports being applied
                await asyncio.wait(set(self._tasks), timeout=self._timeout)
            if not connection.is_open:
                # Taken over meanwhile: the node is back with its session (or the broker went).
                log.info("the broker session %s was taken back while being drained; left to it", client_id)
                return heard[0]
        finally:
            await connection.close()
        # A clean session discards the old one, and with it the place in the shared subscription.
        clean = await ClientConnection.open(self._address, client_id, clean_session=True, keepalive=0,
                                            on_message=lambda message: message.ack(), timeout=self._timeout)
        await clean.close()
        log.info("the broker session %s of a dead node ended; %d report(s) queued for it applied", client_id, heard[0])
        return heard[0]

    async def wait_sent(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every queued command (tests, shutdown)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._commands and loop.time() < deadline:
            await asyncio.sleep(0.02)
        return not self._commands

    async def stop(self) -> None:
        """Send what is queued (briefly), DISCONNECT and stop. Reports not yet committed were not
        acknowledged: the broker keeps them for otad's session."""
        if self._connection is not None and self._connection.is_open:
            await self.wait_sent(min(self._timeout, 2.0))
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        self.connected.clear()
        if self._commands:
            log.warning("%d OTA command(s) not acknowledged by the broker at shutdown; they are restored "
                        "from the open upgrades at the next start", len(self._commands))
