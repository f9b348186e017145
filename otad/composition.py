"""What every entry point needs to build otad's services: the data directory, the database, and
the one mapping from ``Settings`` to ``build_services``.

``otad serve`` (``Daemon``) and the local admin commands (token, user, device) both build their
services here, so a setting that reaches the services reaches them the same way in both.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path

from otad.cache_sync import CacheSync
from otad.cluster import Announcer, is_postgres
from otad.config import Settings, redact_url
from otad.errors import StartupError
from otad.firmware import DirectoryStore, FirmwareStore
from otad.mqtt.dynsec import DynsecProvisioner
from otad.service import Services, build_services
from otad.service.clock import utc_now
from otad.service.ports import DeviceCredentials, NoProvisioning, Publisher
from otad.service.signing import SignedOffers
from otad.signing_keys import KeyRing
from otad.store.database import Database
from otad.store.store import Store


def prepare_data_dir(settings: Settings) -> None:
    """Create the data directory and prove it is writable, or raise one clear StartupError."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if not settings.firmware.url:  # a shared mount is never created here (DirectoryStore.prepare)
            settings.firmware_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.data_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data directory {settings.data_dir} is not writable: {exc.strerror or exc}") from None


def data_dir_notice(settings: Settings) -> str:
    """One line naming the data directory, and saying so when it holds no database yet (opening
    it will create a new, empty one)."""
    where = settings.data_dir.absolute()
    if settings.database.url:
        return f"data directory {where}, database {redact_url(settings.database.url)}"
    if settings.database_path.exists():
        return f"data directory {where}"
    return f"no database in {where} yet: creating a new one"


@contextlib.contextmanager
def exclusive_data_dir(settings: Settings) -> Iterator[None]:
    """One daemon per data directory. A second one would sweep the first one's uploads in progress
    as leftovers before failing on the ports; the lock makes it fail first, touching nothing."""
    path = settings.data_dir / "otad.lock"
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StartupError(f"another otad is already running with data directory {settings.data_dir}") from None
        yield
    finally:
        os.close(handle)  # releases the lock


@contextlib.asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[Database]:
    """The database, for the daemon and the local admin commands alike (SQLite in WAL mode lets
    both have it open; PostgreSQL at ``database.url`` when set). The data directory must exist
    (``prepare_data_dir``)."""
    database = Database(settings.database_path, settings.database.url)
    where = redact_url(settings.database.url) if settings.database.url else settings.database_path
    try:
        await database.open()
    except Exception as exc:
        await database.close()
        raise StartupError(f"cannot open database {where}: {exc}") from None
    try:
        yield database
    finally:
        await database.close()


def login_marker(settings: Settings) -> Path:
    """A file an admin command touches after changing device passwords (reset-password): the daemon
    on the same data directory caches password hashes, and drops that cache when the file changes."""
    return settings.data_dir / "device-logins.changed"


def device_accounts(settings: Settings) -> DeviceCredentials:
    """Where device accounts are pushed: mosquitto's dynamic-security plugin, or nowhere (the
    embedded broker and the http-hooks read otad's own registry)."""
    if settings.mqtt.provisioning == "mosquitto-dynsec":
        return DynsecProvisioner(settings.mqtt.external_url, settings.mqtt.connect_timeout)
    return NoProvisioning()


def node_name(settings: Settings) -> str:
    """This daemon's name on a shared firmware store: the host and its data directory (which
    one daemon at a time holds), so two nodes on one host are two names."""
    where = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{where}"


def firmware_store(settings: Settings) -> FirmwareStore:
    """The store ``firmware.url`` names: the data directory's, a shared mount (file://) or an
    S3-compatible bucket (s3://). Its ``aclose()`` is the caller's."""
    url = settings.firmware.url
    if url.startswith("s3://"):
        try:
            from otad.firmware.s3 import S3Store  # aiobotocore is loaded only where S3 is used
        except ImportError as exc:
            raise StartupError(f"firmware.url {url} needs the S3 client: pip install 'otad[s3]' ({exc})") from None
        return S3Store(url, settings.firmware.s3_endpoint)
    if url:
        return DirectoryStore(settings.firmware_dir, node=node_name(settings))
    return DirectoryStore(settings.firmware_dir)


def services_for(settings: Settings, firmware: FirmwareStore, publisher: Publisher,
                 clock: Callable[[], datetime] = utc_now, accounts: DeviceCredentials | None = None,
                 signing_keys: KeyRing | None = None) -> Services:
    """``build_services`` with every argument that comes from the settings taken from them, on the
    one ``Store`` (the database is open by now: ``open_database``). ``signing_keys``: the key
    directory the caller re-reads (the daemon's ``KeyRing.watch``); else one read once here."""
    services = build_services(Store(), firmware, publisher, settings.http.max_upload_size,
                              xiaozhi_default_product_id=settings.xiaozhi.default_product_id,
                              upgrade_timeout=settings.upgrade.timeout, clock=clock,
                              timeline_limit=settings.upgrade.timeline_limit,
                              login_max_failures=settings.http.login_max_failures,
                              login_window=settings.http.login_window, accounts=accounts,
                              chunk_max_size=settings.mqtt.chunk_max_size,
                              chunk_transfers_per_device=settings.mqtt.chunk_transfers_per_device,
                              delta_scratch_dir=settings.data_dir / "delta-work",
                              auto_delta=settings.firmware.auto_delta)
    if settings.signing.enabled:  # last: the signature covers what every other extension added
        services.offers.add(signed_offers(settings, clock, signing_keys))
    return services


def signed_offers(settings: Settings, clock: Callable[[], datetime] = utc_now,
                  keys: KeyRing | None = None) -> SignedOffers:
    """The signing extension on the key directory; StartupError (naming `otad key create`) when it
    holds no signing key, so a daemon told to sign never starts sending unsigned commands."""
    keys = keys or KeyRing(settings.key_dir)
    keys.load()  # at start, before anything is served: the only read of it on the event loop
    return SignedOffers(keys, settings.signing.reply_lifetime, clock)


class NoPublisher:
    """The publisher of the local admin commands: they run beside the daemon, not as it, and
    reach no device. The daemon restores pending commands when it starts."""

    async def send_command(self, device_name: str, payload: bytes) -> None:
        raise StartupError("upgrades are enabled through the running daemon's HTTP API")

    async def keep_command(self, device_name: str, payload: bytes) -> None:
        pass

    async def clear_command(self, device_name: str) -> None:
        pass  # the daemon restores only open upgrades at start, so nothing stale is kept

    async def forget_device(self, device_name: str) -> None:
        pass  # a running daemon refuses the deleted device's next login


@contextlib.asynccontextmanager
async def admin_services(settings: Settings) -> AsyncIterator[Services]:
    """The services of a local admin command, on the data directory's database (which the
    daemon may have open at the same time)."""
    prepare_data_dir(settings)
    firmware = firmware_store(settings)  # no admin command touches firmware: an S3 one never connects
    async with open_database(settings), contextlib.aclosing(firmware):
        # The admin commands push device accounts to the broker themselves (device add,
        # reset-password), over a short connection of their own: no running daemon is needed.
        accounts = device_accounts(settings)
        services = services_for(settings, firmware, NoPublisher(), accounts=accounts)
        changed: list[str] = []
        services.devices.on_login_change(changed.append)
        # On PostgreSQL the running nodes, wherever they are, drop what the command changed.
        nodes = Announcer(settings.database.url) if is_postgres(settings.database.url) else None
        if nodes is not None:
            CacheSync(services).attach(nodes)
        try:
            yield services
        finally:
            services.admins.close()  # its password-hashing threads
            await accounts.close()
            if changed:
                login_marker(settings).touch()
            if nodes is not None:
                await nodes.flush()
