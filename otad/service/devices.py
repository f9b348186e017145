"""The device registry: devices, their product and their MQTT password."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from otad.errors import Conflict, InvalidInput, MissingInput, NotFound
from otad.service import credentials
from otad.service.clock import utc_now
from otad.service.ports import DeviceCredentials, NoProvisioning, Publisher
from otad.service.validation import DEVICE_NAME, check_device_name, parse_int
from otad.model import DeviceRecord, Duplicate

MAX_BULK = 10_000


@dataclass(frozen=True)
class NewDevice:
    name: str
    product_id: int
    password: str  # shown once, stored hashed


class DeviceRegistry:
    def __init__(self, store, publisher: Publisher, accounts: DeviceCredentials | None = None) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._publisher = publisher
        # Device accounts on an external broker (mosquitto-dynsec); nothing for the embedded one.
        self._accounts = accounts or NoProvisioning()
        # name -> password hash of devices known to exist, so a connect storm of thousands of
        # devices is not thousands of database round trips. A miss falls through to the database
        # (devices added by ``otad device add`` in another process are found at once); deletion
        # goes through this registry, which forgets the entry.
        self._login_cache: dict[str, str] = {}
        self._deletions = 0  # a lookup that raced a deletion must not re-cache the deleted device
        self._delete_listeners: list[Callable[[str], object]] = []
        # Told of every change to a device's login made here (deleted, new password): the other
        # nodes sharing the database drop their cached entry (otad.cache_sync).
        self._login_listeners: list[Callable[[str], object]] = []
        # Connects and disconnects, kept in memory and written in batches: a fleet reconnecting at
        # once must not become thousands of single-row writes.
        self._presence: dict[str, tuple[bool, datetime]] = {}
        self._presence_listeners: list[Callable[[str, bool], None]] = []

    def note_presence(self, name: str, online: bool) -> None:
        self._presence[name] = (online, utc_now())
        for listener in self._presence_listeners:
            listener(name, online)

    def on_presence(self, listener: Callable[[str, bool], None]) -> None:
        """Call ``listener(name, online)`` when a device connects or goes (live screens)."""
        self._presence_listeners.append(listener)

    async def reset_presence(self, every_device: bool = True) -> None:
        """At start: whatever was online when the last process ended (even by kill -9) is not now.

        ``every_device`` False: other nodes share the database and their devices are online on
        them; only what this process noted is dropped (a node-scoped reset: the rows are theirs)."""
        self._presence = {}
        if every_device:
            await self._store.repo.mark_all_offline()

    async def flush_presence(self) -> int:
        pending, self._presence = self._presence, {}
        if pending:
            try:
                await self._store.repo.save_presence(pending)
            except BaseException:
                self._presence = {**pending, **self._presence}  # written next time
                raise
        return len(pending)

    def on_delete(self, listener: Callable[[str], object]) -> None:
        """Call ``listener(name)`` after a device is deleted (other use cases' caches)."""
        self._delete_listeners.append(listener)

    def on_login_change(self, listener: Callable[[str], object]) -> None:
        """Call ``listener(name)`` after a device's login changed here: deleted or a new password."""
        self._login_listeners.append(listener)

    def _login_changed(self, name: str) -> None:
        for listener in self._login_listeners:
            listener(name)

    def forget_logins(self, name: str | None = None) -> None:
        """Drop the cached password of ``name`` (of every device when None): another node changed it."""
        self._deletions += 1
        if name is None:
            self._login_cache.clear()
        else:
            self._login_cache.pop(name, None)

    def deleted_elsewhere(self, name: str) -> None:
        """Another node deleted ``name``: its login and every other cache of it go here too."""
        self.forget_logins(name)
        for listener in self._delete_listeners:
            listener(name)

    async def warm_login_cache(self) -> int:
        deletions = self._deletions
        cache = {device.name: device.password_hash for device in await self._store.repo.list_devices()}
        # Another node's deletion or password change heard while reading: not cached from a stale read.
        self._login_cache = cache if deletions == self._deletions else {}
        return len(self._login_cache)

    async def add(self, items: list[dict] | dict) -> list[NewDevice]:
        """Register one device or many, all or nothing; returns each new password once."""
        items = items if isinstance(items, list) else [items]
        if not items:
            raise MissingInput("参数缺失: no devices given")
        if len(items) > MAX_BULK:
            raise InvalidInput(f"参数无效: at most {MAX_BULK} devices per request")
        new: list[NewDevice] = []
        for item in items:
            if not isinstance(item, dict):
                raise InvalidInput('参数无效: each device is an object {"deviceName", "productId"}')
            name = check_device_name(item.get("deviceName"))
            new.append(NewDevice(name, parse_int(item.get("productId"), "productId"), credentials.new_secret()))
        names = [device.name for device in new]
        if len(set(names)) != len(names):
            raise Conflict("参数无效: the same deviceName is given twice")
        hashes = {device.name: credentials.hash_secret(device.password) for device in new}
        try:
            await self._store.repo.insert_devices((d.name, d.product_id, hashes[d.name]) for d in new)
        except Duplicate as exc:
            raise Conflict(f"参数无效: device already exists: {exc}") from None
        try:
            # After the insert: a duplicate must not touch the existing device's broker account.
            await self._accounts.provision([(device.name, device.password) for device in new])
        except BaseException:
            for device in new:  # all or nothing: the devices the broker would refuse are not kept
                await self._store.repo.delete_device(device.name)
            raise
        self._login_cache.update(hashes)
        return new

    async def reset_passwords(self, names: list[str] | None) -> list[NewDevice]:
        """New passwords for the named devices (every device when None), stored hashed and pushed
        to the broker's accounts first; returns each new password once."""
        if names is None:
            devices = await self._store.repo.list_devices()
        else:
            devices = [await self.get(name) for name in names]
        new = [NewDevice(device.name, device.product_id, credentials.new_secret()) for device in devices]
        hashes = {device.name: credentials.hash_secret(device.password) for device in new}
        # The broker first: if it fails, the stored passwords (which devices use now) are unchanged.
        await self._accounts.provision([(device.name, device.password) for device in new])
        await self._store.device_passwords.set_password_hashes(hashes)
        self._deletions += 1  # a login lookup in flight must not cache the old hash
        for name, hashed in hashes.items():
            self._login_cache[name] = hashed
            self._login_changed(name)
        return new

    async def get(self, name: str) -> DeviceRecord:
        device = await self._store.repo.find_device(check_device_name(name))
        if device is None:
            raise NotFound(f"参数无效: no device named '{name}'")
        return device

    async def list(self) -> list[DeviceRecord]:
        devices = await self._store.repo.list_devices()
        if not self._presence:
            return devices
        return [replace(d, online=self._presence[d.name][0], last_seen=self._presence[d.name][1])
                if d.name in self._presence else d for d in devices]

    async def delete(self, name: str) -> None:
        name = check_device_name(name)
        # The broker account first: if it stays, so does the device, and a retry deletes both.
        await self._accounts.revoke(name)
        deleted = await self._store.repo.delete_device(name)
        self._deletions += 1
        self._login_cache.pop(name, None)
        for listener in self._delete_listeners:
            listener(name)
        self._login_changed(name)
        if not deleted:
            raise NotFound(f"参数无效: no device named '{name}'")
        await self._publisher.forget_device(name)

    async def is_registered(self, name: str) -> bool:
        """True when ``name`` is a registered device (a client certificate names it)."""
        if not DEVICE_NAME.fullmatch(name):
            return False
        return name in self._login_cache or await self._store.repo.find_device(name) is not None

    async def check_mqtt_login(self, username: str | None, password: str | bytes | None) -> bool:
        """True when ``username`` is a registered device and ``password`` is its password."""
        if not username or password is None or not DEVICE_NAME.fullmatch(username):
            return False
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        stored = self._login_cache.get(username)
        if stored is None:
            deletions = self._deletions
            device = await self._store.repo.find_device(username)
            if device is None:
                return False
            stored = device.password_hash
            if deletions == self._deletions:
                self._login_cache[username] = stored
        elif not credentials.secret_matches(password, stored):
            # A wrong password against the cache: read once more, so a password reset by
            # `otad device reset-password` in another process is honoured at once.
            device = await self._store.repo.find_device(username)
            if device is None or device.password_hash == stored:
                return False
            stored = self._login_cache[username] = device.password_hash
        return credentials.secret_matches(password, stored)
