"""The daemon: builds store -> service -> broker -> HTTP (services through ``otad.composition``,
as the admin commands do), and owns start and stop order."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from aiohttp import web

from otad import systemd
from otad.cache_sync import CacheSync
from otad.cluster import ClusterNode, SoleNode, is_postgres
from otad.composition import (data_dir_notice, device_accounts, exclusive_data_dir, firmware_store, login_marker,
                              open_database, prepare_data_dir, services_for)
from otad.config import Settings, redact_url
from otad.errors import StartupError
from otad import limits
from otad.http.app import ACCESS_LOG_FORMAT, create_app
from otad.http.connections import ConnectionGuard, ResponseEndLogger
from otad.limits import raise_open_file_limit
from otad.metrics import Metrics
from otad.http.observe import RequestObserver
from otad.mqtt.access import AccessPolicy
from otad.mqtt.external import ExternalBroker, node_client_id
from otad.mqtt.server import EmbeddedBroker
from otad.service import Services
from otad.service.clock import utc_now
from otad.service.health import DATABASE, FIRMWARE
from otad.signing_keys import KeyRing
from otad.store.failures import storage_failure
from otad.tls import Certificates
from otad.web import install as install_dashboard

log = logging.getLogger(__name__)

_MAINTENANCE_INTERVAL = 5.0
_CAMPAIGN_TICK = 0.5
# What aiohttp's own shutdown waits for handlers after ours has waited shutdown_timeout: closing
# then must not take another whole timeout.
_AIOHTTP_SHUTDOWN_GRACE = 0.5


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class Daemon:
    """One otad: the database, the embedded broker and the HTTP server, started and stopped together."""

    def __init__(self, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.settings = settings
        self._clock = clock
        self._context = contextvars.copy_context()
        self.services: Services | None = None
        self._stack = contextlib.AsyncExitStack()
        self.metrics = Metrics()
        self._file_limit = raise_open_file_limit()  # logged once the daemon starts
        self.budget = limits.share(self._file_limit.soft, settings.http.max_connections,
                                   settings.mqtt.max_connections)
        self.connections = ConnectionGuard(self.budget.http_connections, settings.http.head_timeout, self.metrics)
        self._observer = RequestObserver(self.metrics)
        # mqtt.mode: otad's own broker, or otad as a client of an external one (same Publisher port).
        self._broker: EmbeddedBroker | ExternalBroker = ExternalBroker(settings.mqtt, settings.data_dir) \
            if settings.mqtt.mode == "external" else \
            EmbeddedBroker(replace(settings.mqtt, max_connections=self.budget.mqtt_connections), self.metrics)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.certificates = Certificates()  # of every TLS listener; reload() on SIGHUP
        self._logins_seen: float | None = None  # login_marker's mtime when last looked at
        self.node: ClusterNode | SoleNode = SoleNode()  # the leader, or one of several (PostgreSQL)
        # Re-read every signing.key_recheck seconds in a thread (KeyRing.watch), never per message.
        self.signing_keys = KeyRing(settings.key_dir) if settings.signing.enabled else None

    @property
    def http_port(self) -> int:
        assert self._listener is not None
        return self._listener.sockets[0].getsockname()[1]

    @property
    def mqtt_port(self) -> int | None:
        """The embedded broker's port; None in external mode (otad listens for no MQTT then)."""
        return self._broker.port

    @property
    def mqtt_tls_port(self) -> int | None:
        return self._broker.tls_port

    @property
    def mqtt_ws_port(self) -> int | None:
        return self._broker.ws_port

    def reload_certificates(self) -> None:
        """SIGHUP: re-read every TLS certificate; new connections get the new ones."""
        self.certificates.reload()

    async def start(self) -> None:
        """Start every component in order; on failure, stop what started and raise StartupError."""
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise

    async def _start(self) -> None:
        settings = self.settings
        prepare_data_dir(settings)
        self._stack.enter_context(exclusive_data_dir(settings))
        log.info("%s", data_dir_notice(settings))
        await self._stack.enter_async_context(open_database(settings))
        self._context = contextvars.copy_context()
        firmware = firmware_store(settings)
        self._stack.push_async_callback(firmware.aclose)
        await firmware.prepare()
        log.info("firmware store: %s", firmware.describe())
        accounts = device_accounts(settings)
        self._stack.push_async_callback(accounts.close)
        self.services = services = services_for(settings, firmware, self._broker, self._clock, accounts,
                                                self.signing_keys)
        if self.signing_keys is not None:
            keys = asyncio.create_task(self.signing_keys.watch(settings.signing.key_recheck), name="otad-signing-keys")
            self._stack.push_async_callback(_cancel, keys)
        self._stack.callback(services.admins.close)  # the password-hashing threads, last
        self._stack.push_async_callback(services.deltas.aclose)  # a patch being built, before the database
        services.health.add_probe(DATABASE, services.health.probe_database)
        services.health.add_probe(FIRMWARE, firmware.probe)
        await firmware.sweep_orphans({package.file_name for package in await services.packages.list()}
                                     | await services.deltas.file_names())

        await self._join_cluster(services)  # before the caches fill: another node's change is heard
        self._logins_seen = _mtime(login_marker(settings))
        await services.devices.warm_login_cache()
        # Nobody is connected to a broker that is not started; but other nodes' devices are online
        # on them, and an external broker's devices are its own: then the rows are left as they are.
        embedded, alone = settings.mqtt.mode == "embedded", await self.node.alone()
        if embedded and not alone:
            log.warning("other otad nodes run on this database, each with its own embedded broker: a command "
                        "reaches only the devices connected to the node that sends it. Several nodes need "
                        "mqtt.mode = external (README: Running several nodes)")
        await services.devices.reset_presence(every_device=embedded and alone)

        async def on_report(device_name: str, payload: bytes) -> bytes:
            return (await services.ingest.submit(device_name, payload)).to_json()

        # Stopped in reverse: the broker's last disconnects are noted before presence is written,
        # and the connections are gone before the batch being written is finished.
        self._stack.push_async_callback(services.devices.flush_presence)
        services.ingest.start()
        self._stack.push_async_callback(services.ingest.stop)
        mqtt, http = settings.mqtt, settings.http
        mqtt_tls = self.certificates.server_context("MQTT", mqtt.certfile, mqtt.keyfile, mqtt.cafile) \
            if mqtt.tls_port and mqtt.certfile and mqtt.keyfile else None
        http_tls = self.certificates.server_context("HTTPS", http.certfile, http.keyfile) \
            if http.certfile and http.keyfile else None
        if isinstance(self._broker, ExternalBroker):
            # Presence: the external broker's business.
            await self._broker.start(on_report, on_session_lost=services.upgrades.restore_pending,
                                     chunks=services.chunks)
        else:
            await self._broker.start(AccessPolicy(services.devices, settings.mqtt.allow_anonymous), on_report,
                                     services.devices.note_presence, mqtt_tls, chunks=services.chunks)
        self._stack.push_async_callback(self._broker.stop)
        # Before the campaign engine runs: it may supersede what is being restored.
        restored = await self._restore_commands(services)
        if restored:
            log.info("restored the pending OTA command of %d device(s)", restored)
        maintenance = asyncio.create_task(self._maintain(services), name="otad-maintenance")
        self._stack.push_async_callback(_cancel, maintenance)
        rollouts = asyncio.create_task(self._roll_out(services), name="otad-campaigns")
        self._stack.push_async_callback(_cancel, rollouts)

        app = create_app(services, settings, self._observer, self.metrics, self.health, self.connections,
                         dashboard=lambda app: install_dashboard(app, services, body_timeout=settings.http.body_timeout))
        # Bodies are read raw (a compressed one is refused, never inflated on the event loop), and
        # aiohttp closes idle keep-alive connections; the guard handles heads and the cap.
        self._runner = web.AppRunner(app, shutdown_timeout=_AIOHTTP_SHUTDOWN_GRACE, access_log_format=ACCESS_LOG_FORMAT,
                                     access_log_class=ResponseEndLogger, auto_decompress=False,
                                     keepalive_timeout=settings.http.keepalive_timeout)
        await self._runner.setup()
        self._stack.push_async_callback(self._stop_http)
        try:
            self._listener = await asyncio.get_running_loop().create_server(
                self.connections.factory(self._runner.server), settings.http.host, settings.http.port,
                reuse_address=True, backlog=128, ssl=http_tls,
                # A TLS handshake that never finishes is bounded like a request head that never comes.
                ssl_handshake_timeout=settings.http.head_timeout if http_tls is not None else None)
        except OSError as exc:
            raise StartupError(f"cannot listen for HTTP on {settings.http.host}:{settings.http.port}: "
                               f"{exc.strerror or exc}") from None
        log.info("HTTP API listening on %s:%d%s (at most %d connections; MQTT at most %d; %s)",
                 settings.http.host, self.http_port, " (HTTPS)" if http_tls is not None else "",
                 self.budget.http_connections, self.budget.mqtt_connections,
                 self._file_limit.describe())

    async def _join_cluster(self, services: Services) -> None:
        """On PostgreSQL: the dedicated session for leadership and other nodes' changes."""
        url = self.settings.database.url
        if not is_postgres(url):
            self.metrics.leader.set(1)  # SQLite: the only node
            return
        # A device deleted on another node: this node's embedded broker ends its sessions. An
        # external broker was told once, by the node that deleted it.
        forget = self._broker.forget_device if self.settings.mqtt.mode == "embedded" else None
        sync = CacheSync(services, forget_device=forget)
        if isinstance(self._broker, ExternalBroker):
            # Known to the others by its broker client id: the leader retires a dead node's session.
            name, broker = node_client_id(self.settings.data_dir), self._broker
            gone = lambda peer: sync.spawn(broker.retire_session(peer))  # noqa: E731
        else:
            name, gone = "embedded", lambda peer: None
        node = ClusterNode(url, sync.heard, sync.forget_everything, self.metrics.leader.set, name, gone)
        sync.attach(node)
        await node.start()
        self.node = node
        self._stack.push_async_callback(node.stop)  # late: the last changes still reach the others
        self._stack.push_async_callback(sync.close)

    async def alive(self) -> dict[str, bool]:
        """What the systemd watchdog checks: the broker serves, the database answers. A full disk
        is not here: restarting would not free any space."""
        try:
            database = await asyncio.wait_for(self.services.health.database_alive(), 5)
        except Exception:
            database = False
        return {"broker": self._broker.is_serving(), "database": database}

    async def health(self) -> dict[str, bool | str]:
        """What /healthz shows: each part true, or why it is failing (a full disk, say)."""
        checks: dict[str, bool | str] = {**await self.alive(), FIRMWARE: True}
        assert self.services is not None
        for part, reason in (await self.services.health.recheck()).items():
            checks[part] = reason
        return checks

    async def _maintain(self, services: Services) -> None:
        """Every few seconds: time out overdue upgrades (on the leader only), write devices'
        presence. Survives errors."""
        while True:
            await asyncio.sleep(_MAINTENANCE_INTERVAL)
            jobs = (services.devices.flush_presence, services.health.recheck, self._notice_login_changes)
            for job in (services.upgrades.expire_due, *jobs) if self.node.leading else jobs:
                try:
                    await job()
                except Exception as exc:
                    if (failure := storage_failure(exc)) is not None:  # a full disk: shown in /healthz
                        services.health.failing(DATABASE, failure.message)
                        log.warning("maintenance job %s: %s; retrying next round", job.__qualname__, failure.message)
                    else:
                        log.exception("maintenance job %s failed; retrying next round", job.__qualname__)

    async def _notice_login_changes(self) -> None:
        """An admin command on this data directory gave devices new passwords: the cached hashes
        would still let the old ones in, so they go (re-read on the next logins)."""
        seen = _mtime(login_marker(self.settings))
        if seen != self._logins_seen and self.services is not None:
            self._logins_seen = seen
            self.services.devices.forget_logins()
            log.info("device passwords changed by an admin command: login cache dropped")

    async def _roll_out(self, services: Services) -> None:
        """The campaign engine's heartbeat, on the leader only; a failing step is logged and tried again."""
        leading, starting = False, True  # start-up itself restored the pending commands
        while True:
            if not self.node.leading:
                leading = False
            else:
                if not leading:  # just became the leader: what the engine saw when it last led is stale
                    services.campaigns.forget_views()
                    leading = True
                    if not starting:
                        await self._restore_after_takeover(services)
                try:
                    await services.campaigns.tick()
                except Exception:
                    log.exception("campaign engine step failed")
            starting = False
            await asyncio.sleep(_CAMPAIGN_TICK)

    async def _restore_commands(self, services: Services) -> int:
        """Keep every open upgrade's command again; an external broker holds reports meanwhile (see
        ExternalBroker.without_reports: otad's session there delivers queued reports at once)."""
        if isinstance(self._broker, ExternalBroker):
            return await self._broker.without_reports(services.upgrades.restore_pending)
        return await services.upgrades.restore_pending()

    async def _restore_after_takeover(self, services: Services) -> None:
        """A leader that died between recording upgrades and publishing their commands left them
        unsent: the new leader sends every open upgrade's command again, as a start does (a
        duplicate at worst, which QoS 1 allows)."""
        try:
            restored = await self._restore_commands(services)
        except Exception:
            log.exception("restoring the pending OTA commands after taking over failed")
        else:
            log.info("took over: restored the pending OTA command of %d device(s)", restored)

    async def _stop_http(self) -> None:
        """Stop listening, give in-flight requests (downloads included) ``shutdown_timeout`` in
        all, then close what is left."""
        assert self._runner is not None
        if self._listener is not None:
            self._listener.close()  # no new connections
            if self.services is not None:
                self.services.live.close()  # live pages' streams end now: they never finish by themselves
            timeout = self.settings.http.shutdown_timeout
            if not await self._observer.wait_idle(timeout):
                log.warning("requests still running after %.0f s; closing them", timeout)
        await self._runner.cleanup()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then broker and database.

        Runs in the context the daemon started in: the ORM's connections are found through a
        context variable, and the caller of stop() may be another task (a signal handler, a test
        fixture) that never saw them."""
        await asyncio.create_task(self._stack.aclose(), context=self._context)


async def _watchdog(daemon: Daemon) -> None:
    """systemd's watchdog (WatchdogSec=): ping at half the interval, only while healthy, so a hung
    or broken daemon is restarted."""
    interval = systemd.watchdog_interval()
    if interval is None:
        return
    while True:
        await asyncio.sleep(interval / 2)
        checks = await daemon.alive()
        if all(checks.values()):
            systemd.notify("WATCHDOG=1")
        else:
            log.error("health check failed, not pinging the watchdog: %s", checks)


def tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic collections for a process holding thousands of connections.

    Every connection keeps a hundred or so objects alive; with CPython's default thresholds a
    connect storm of 10,000 devices spends about half its time in collections that walk them all
    (bench/broker_fanout.py: 8.0 s -> 4.4 s to connect, 1.6 s -> 0.9 s to fan out). Freezing what
    start-up created and collecting the young generation less often keeps that work proportional.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down within a bounded time."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(settings)
    # Before start: a SIGHUP during start-up must not end the process (its default action).
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_certificates)
    await daemon.start()
    tune_garbage_collector()
    systemd.notify("READY=1")
    mqtt = f"MQTT on {daemon.mqtt_port}" if daemon.mqtt_port else f"MQTT via {redact_url(settings.mqtt.external_url)}"
    systemd.notify(f"STATUS=serving HTTP on {daemon.http_port}, {mqtt}")
    log.info("otad ready")
    watchdog = asyncio.create_task(_watchdog(daemon), name="otad-watchdog")
    await stop.wait()
    await _cancel(watchdog)
    log.info("stopping")
    systemd.notify("STOPPING=1")
    try:
        await asyncio.wait_for(daemon.stop(), timeout=settings.http.shutdown_timeout + 10)
    except TimeoutError:
        log.error("shutdown did not finish in time; exiting anyway")
    log.info("stopped")
