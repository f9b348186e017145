"""Repository functions for accounts, devices, packages and pins, returning plain records
(upgrades and campaigns are in ``otad.store.rollouts``).

Integrity errors never leave this module as tortoise exceptions: a unique clash is ``Duplicate``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime

from tortoise.exceptions import IntegrityError
from tortoise.expressions import F
from tortoise.transactions import in_transaction

from otad.store.dialect import sql
from otad.store.failures import translate_storage_errors
from otad.store.models import SchemaVersion, ApiToken, Campaign, Device, Package, PassivePin, User, XiaozhiPin
from otad.store.transactions import shielded
from otad.model import (DeviceRecord, Duplicate, Inventory, PackageRecord, PassivePinRecord, StillUsed, TokenRecord,
                        UserRecord, XiaozhiPinRecord)


def _token(row: ApiToken) -> TokenRecord:
    return TokenRecord(name=row.name, kind=row.kind, created_at=row.created_at, expires_at=row.expires_at,
                       role=row.role)


def _user(row: User) -> UserRecord:
    return UserRecord(id=row.id, username=row.username, password_hash=row.password_hash, role=row.role,
                      created_at=row.created_at)


_INVENTORY_FIELDS = tuple(field.name for field in dataclasses.fields(Inventory))


def device_record(row: Device) -> DeviceRecord:
    return DeviceRecord(id=row.id, name=row.name, product_id=row.product_id, password_hash=row.password_hash,
                        created_at=row.created_at,
                        inventory=Inventory(**{name: getattr(row, name) for name in _INVENTORY_FIELDS}),
                        firmware_version=row.firmware_version, online=row.online, last_seen=row.last_seen)


def _package(row: Package) -> PackageRecord:
    return PackageRecord(
        id=row.id, product_id=row.product_id, name=row.name, file_name=row.file_name,
        original_name=row.original_name, size=row.size, md5=row.md5, sha256=row.sha256,
        version=row.version, description=row.description, created_at=row.created_at,
    )


# --- admin tokens and users ---


async def _delete_login_tokens(name_prefix: str) -> int:
    # Matched here rather than with LIKE: SQLite's LIKE ignores case and treats '_' (allowed in
    # usernames) as a wildcard, so it would revoke another user's tokens too.
    names = [name for name in await ApiToken.filter(kind="login").values_list("name", flat=True)
             if name.startswith(name_prefix)]
    return await ApiToken.filter(name__in=names).delete() if names else 0


# --- devices ---


# --- packages ---


# --- passive pins (per device) and xiaozhi pins (per product) ---

def _passive_pin(row: PassivePin) -> PassivePinRecord:
    return PassivePinRecord(id=row.id, device_id=row.device_id, device_name=row.device.name,
                            package=_package(row.package), version_name=row.version_name,
                            description=row.description)


def _xiaozhi_pin(row: XiaozhiPin) -> XiaozhiPinRecord:
    return XiaozhiPinRecord(id=row.id, product_id=row.product_id, package=_package(row.package),
                            version_name=row.version_name, force=row.force)


# --- device state reported over MQTT ---


class Repo:
    """Accounts, devices, packages and pins: the operations, as methods of the object the composition root builds."""

    async def insert_token(self, name: str, token_hash: str, kind: str, expires_at: datetime | None, role: str) -> None:
        try:
            await ApiToken.create(name=name, token_hash=token_hash, kind=kind, expires_at=expires_at, role=role)
        except IntegrityError:
            raise Duplicate(name) from None

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        row = await ApiToken.get_or_none(token_hash=token_hash)
        return _token(row) if row else None

    async def list_tokens(self, kind: str | None = None) -> list[TokenRecord]:
        """The tokens of one kind ("api" or "login"), or of every kind, by name."""
        query = ApiToken.all() if kind is None else ApiToken.filter(kind=kind)
        return [_token(row) for row in await query.order_by("name")]

    async def delete_token(self, name: str) -> bool:
        return await ApiToken.filter(name=name).delete() > 0

    async def delete_expired_tokens(self, now: datetime) -> int:
        return await ApiToken.filter(expires_at__lt=now).delete()

    async def insert_user(self, username: str, password_hash: str, role: str) -> None:
        try:
            await User.create(username=username, password_hash=password_hash, role=role)
        except IntegrityError:
            raise Duplicate(username) from None

    async def find_user(self, username: str) -> UserRecord | None:
        row = await User.get_or_none(username=username)
        return _user(row) if row else None

    async def list_users(self) -> list[UserRecord]:
        return [_user(row) for row in await User.all().order_by("username")]

    @shielded
    async def set_user_password(self, username: str, password_hash: str, token_prefix: str) -> int | None:
        """Replace a user's password hash and delete the login tokens named ``token_prefix...`` in one
        transaction; the number of tokens deleted, or None if there is no such user."""
        async with in_transaction():
            if not await User.filter(username=username).update(password_hash=password_hash):
                return None
            return await _delete_login_tokens(token_prefix)

    @shielded
    async def delete_user(self, username: str, token_prefix: str) -> int | None:
        """Delete a user and the login tokens named ``token_prefix...`` in one transaction; the number
        of tokens deleted, or None if there is no such user."""
        async with in_transaction():
            if not await User.filter(username=username).delete():
                return None
            return await _delete_login_tokens(token_prefix)

    @shielded
    async def insert_devices(self, rows: Iterable[tuple[str, int, str]]) -> None:
        """Insert ``(name, product_id, password_hash)`` rows all or nothing."""
        rows = list(rows)
        names = [name for name, _, _ in rows]
        async with in_transaction():
            taken = await Device.filter(name__in=names).values_list("name", flat=True)
            if taken:
                raise Duplicate(", ".join(sorted(taken)))
            try:
                await Device.bulk_create(
                    [Device(name=name, product_id=product_id, password_hash=hashed) for name, product_id, hashed in rows],
                    batch_size=500,
                )
            except IntegrityError:
                raise Duplicate(", ".join(names)) from None

    async def find_device(self, name: str) -> DeviceRecord | None:
        row = await Device.get_or_none(name=name)
        return device_record(row) if row else None

    async def list_devices(self) -> list[DeviceRecord]:
        return [device_record(row) for row in await Device.all().order_by("id")]

    async def delete_device(self, name: str) -> bool:
        return await Device.filter(name=name).delete() > 0

    async def save_inventory(self, device_id: int, inventory: Inventory) -> None:
        await Device.filter(id=device_id).update(**dataclasses.asdict(inventory))

    @translate_storage_errors
    async def insert_package(
        self, *, product_id: int, name: str, file_name: str, original_name: str, size: int, md5: str, sha256: str,
        version: str | None, description: str | None,
    ) -> PackageRecord:
        try:
            row = await Package.create(
                product_id=product_id, name=name, file_name=file_name, original_name=original_name, size=size,
                md5=md5, sha256=sha256, version=version, description=description,
            )
        except IntegrityError:
            raise Duplicate(name) from None
        return _package(row)

    async def find_package(self, product_id: int, name: str) -> PackageRecord | None:
        row = await Package.get_or_none(product_id=product_id, name=name)
        return _package(row) if row else None

    async def find_package_by_id(self, package_id: int) -> PackageRecord | None:
        row = await Package.get_or_none(id=package_id)
        return _package(row) if row else None

    async def find_package_by_file(self, file_name: str) -> PackageRecord | None:
        row = await Package.get_or_none(file_name=file_name)
        return _package(row) if row else None

    async def list_packages(self) -> list[PackageRecord]:
        return [_package(row) for row in await Package.all().order_by("id")]

    async def package_users(self, package_id: int, live_campaign_states: Iterable[str]) -> list[str]:
        """What still needs the package: pins, and campaigns that may yet send it."""
        users = []
        if await PassivePin.exists(package_id=package_id):
            users.append("a passive pin")
        if await XiaozhiPin.exists(package_id=package_id):
            users.append("a xiaozhi pin")
        campaigns = await Campaign.filter(package_id=package_id, state__in=list(live_campaign_states)).values_list(
            "id", flat=True)
        users += [f"campaign {campaign_id}" for campaign_id in campaigns]
        return users

    async def delete_package(self, package_id: int) -> bool:
        try:
            return await Package.filter(id=package_id).delete() > 0
        except IntegrityError:  # a pin was added since the caller checked
            raise StillUsed(package_id) from None

    @shielded
    async def save_passive_pin(self, device_id: int, package_id: int, version_name: str,
                               description: str | None) -> PassivePinRecord:
        """Create or replace the device's pin."""
        async with in_transaction():
            await Device.filter(id=device_id).select_for_update().only("id")  # two saves take turns (PostgreSQL)
            await PassivePin.filter(device_id=device_id).delete()
            row = await PassivePin.create(device_id=device_id, package_id=package_id, version_name=version_name,
                                          description=description)
        await row.fetch_related("device", "package")
        return _passive_pin(row)

    async def find_passive_pin(self, device_name: str) -> PassivePinRecord | None:
        row = await PassivePin.get_or_none(device__name=device_name).prefetch_related("device", "package")
        return _passive_pin(row) if row else None

    async def list_passive_pins(self) -> list[PassivePinRecord]:
        return [_passive_pin(row) for row in await PassivePin.all().order_by("id").prefetch_related("device", "package")]

    async def delete_passive_pin(self, pin_id: int) -> bool:
        return await PassivePin.filter(id=pin_id).delete() > 0

    @shielded
    async def save_xiaozhi_pin(self, product_id: int, package_id: int, version_name: str, force: bool) -> XiaozhiPinRecord:
        """Create or replace the product's pin."""
        async with in_transaction():
            await XiaozhiPin.filter(product_id=product_id).delete()
            row = await XiaozhiPin.create(product_id=product_id, package_id=package_id, version_name=version_name,
                                          force=force)
        await row.fetch_related("package")
        return _xiaozhi_pin(row)

    async def find_xiaozhi_pin(self, product_id: int) -> XiaozhiPinRecord | None:
        row = await XiaozhiPin.get_or_none(product_id=product_id).prefetch_related("package")
        return _xiaozhi_pin(row) if row else None

    async def list_xiaozhi_pins(self) -> list[XiaozhiPinRecord]:
        return [_xiaozhi_pin(row) for row in await XiaozhiPin.all().order_by("id").prefetch_related("package")]

    async def delete_xiaozhi_pin(self, pin_id: int) -> bool:
        return await XiaozhiPin.filter(id=pin_id).delete() > 0

    async def mark_all_offline(self) -> None:
        await Device.filter(online=True).update(online=False)

    @translate_storage_errors
    @shielded
    async def save_presence(self, presence: dict[str, tuple[bool, datetime]]) -> None:
        """Write devices' online flag and last-seen time, batched by the caller: one statement for
        all (a fleet reconnecting is 10,000 rows; one round trip each held the database from the
        report batches for seconds)."""
        async with in_transaction() as conn:
            await conn.execute_many(sql(conn, 'UPDATE "device" SET "online" = ?, "last_seen" = ? WHERE "name" = ?'),
                                    [[online, last_seen, name] for name, (online, last_seen) in presence.items()])

    async def devices_of_product(self, product_id: int, after_id: int = 0) -> list[tuple[int, str]]:
        """(id, name) of the product's devices with an id above ``after_id``, by id."""
        rows = await Device.filter(product_id=product_id, id__gt=after_id).order_by("id").values_list("id", "name")
        return [(row[0], row[1]) for row in rows]

    @translate_storage_errors
    @shielded
    async def probe_write(self) -> None:
        async with in_transaction():
            await SchemaVersion.filter(id=1).update(version=F("version"))

    async def database_alive(self) -> bool:
        await Device.all().limit(1).values_list("id", flat=True)
        return True
