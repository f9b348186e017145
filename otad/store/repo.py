"""Repository functions: every query the service needs, returning plain records.

Integrity errors never leave this module as tortoise exceptions: a unique clash is ``Duplicate``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from datetime import datetime

from tortoise.exceptions import IntegrityError
from tortoise.functions import Count
from tortoise.transactions import in_transaction

from otad.store.models import (ApiToken, Campaign, Device, Package, PassivePin, Upgrade, UpgradeEvent, User,
                               XiaozhiPin)
from otad.store.records import (CampaignRecord, DeviceRecord, Inventory, PackageRecord, PassivePinRecord,
                                TokenRecord, UpgradeEventRecord, UpgradeRecord, UserRecord, XiaozhiPinRecord)


class Duplicate(Exception):
    """A row with the same unique key exists."""


class StillUsed(Exception):
    """A row cannot be deleted while others reference it."""


def _token(row: ApiToken) -> TokenRecord:
    return TokenRecord(name=row.name, kind=row.kind, created_at=row.created_at, expires_at=row.expires_at)


_INVENTORY_FIELDS = tuple(field.name for field in dataclasses.fields(Inventory))


def _device(row: Device) -> DeviceRecord:
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

async def insert_token(name: str, token_hash: str, kind: str, expires_at: datetime | None) -> None:
    try:
        await ApiToken.create(name=name, token_hash=token_hash, kind=kind, expires_at=expires_at)
    except IntegrityError:
        raise Duplicate(name) from None


async def find_token(token_hash: str) -> TokenRecord | None:
    row = await ApiToken.get_or_none(token_hash=token_hash)
    return _token(row) if row else None


async def list_tokens(kind: str) -> list[TokenRecord]:
    return [_token(row) for row in await ApiToken.filter(kind=kind).order_by("name")]


async def delete_token(name: str) -> bool:
    return await ApiToken.filter(name=name).delete() > 0


async def delete_expired_tokens(now: datetime) -> int:
    return await ApiToken.filter(expires_at__lt=now).delete()


async def insert_user(username: str, password_hash: str) -> None:
    try:
        await User.create(username=username, password_hash=password_hash)
    except IntegrityError:
        raise Duplicate(username) from None


async def find_user(username: str) -> UserRecord | None:
    row = await User.get_or_none(username=username)
    return UserRecord(id=row.id, username=row.username, password_hash=row.password_hash) if row else None


# --- devices ---

async def insert_devices(rows: Iterable[tuple[str, int, str]]) -> None:
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


async def find_device(name: str) -> DeviceRecord | None:
    row = await Device.get_or_none(name=name)
    return _device(row) if row else None


async def list_devices() -> list[DeviceRecord]:
    return [_device(row) for row in await Device.all().order_by("id")]


async def delete_device(name: str) -> bool:
    return await Device.filter(name=name).delete() > 0


async def save_inventory(device_id: int, inventory: Inventory) -> None:
    await Device.filter(id=device_id).update(**dataclasses.asdict(inventory))


# --- packages ---

async def insert_package(
    *, product_id: int, name: str, file_name: str, original_name: str, size: int, md5: str, sha256: str,
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


async def find_package(product_id: int, name: str) -> PackageRecord | None:
    row = await Package.get_or_none(product_id=product_id, name=name)
    return _package(row) if row else None


async def find_package_by_id(package_id: int) -> PackageRecord | None:
    row = await Package.get_or_none(id=package_id)
    return _package(row) if row else None


async def find_package_by_file(file_name: str) -> PackageRecord | None:
    row = await Package.get_or_none(file_name=file_name)
    return _package(row) if row else None


async def list_packages() -> list[PackageRecord]:
    return [_package(row) for row in await Package.all().order_by("id")]


async def package_users(package_id: int, live_campaign_states: Iterable[str]) -> list[str]:
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


async def delete_package(package_id: int) -> bool:
    try:
        return await Package.filter(id=package_id).delete() > 0
    except IntegrityError:  # a pin was added since the caller checked
        raise StillUsed(package_id) from None


# --- passive pins (per device) and xiaozhi pins (per product) ---

def _passive_pin(row: PassivePin) -> PassivePinRecord:
    return PassivePinRecord(id=row.id, device_id=row.device_id, device_name=row.device.name,
                            package=_package(row.package), version_name=row.version_name,
                            description=row.description)


async def save_passive_pin(device_id: int, package_id: int, version_name: str,
                           description: str | None) -> PassivePinRecord:
    """Create or replace the device's pin."""
    async with in_transaction():
        await PassivePin.filter(device_id=device_id).delete()
        row = await PassivePin.create(device_id=device_id, package_id=package_id, version_name=version_name,
                                      description=description)
    await row.fetch_related("device", "package")
    return _passive_pin(row)


async def find_passive_pin(device_name: str) -> PassivePinRecord | None:
    row = await PassivePin.get_or_none(device__name=device_name).prefetch_related("device", "package")
    return _passive_pin(row) if row else None


async def list_passive_pins() -> list[PassivePinRecord]:
    return [_passive_pin(row) for row in await PassivePin.all().order_by("id").prefetch_related("device", "package")]


async def delete_passive_pin(pin_id: int) -> bool:
    return await PassivePin.filter(id=pin_id).delete() > 0


def _xiaozhi_pin(row: XiaozhiPin) -> XiaozhiPinRecord:
    return XiaozhiPinRecord(id=row.id, product_id=row.product_id, package=_package(row.package),
                            version_name=row.version_name, force=row.force)


async def save_xiaozhi_pin(product_id: int, package_id: int, version_name: str, force: bool) -> XiaozhiPinRecord:
    """Create or replace the product's pin."""
    async with in_transaction():
        await XiaozhiPin.filter(product_id=product_id).delete()
        row = await XiaozhiPin.create(product_id=product_id, package_id=package_id, version_name=version_name,
                                      force=force)
    await row.fetch_related("package")
    return _xiaozhi_pin(row)


async def find_xiaozhi_pin(product_id: int) -> XiaozhiPinRecord | None:
    row = await XiaozhiPin.get_or_none(product_id=product_id).prefetch_related("package")
    return _xiaozhi_pin(row) if row else None


async def list_xiaozhi_pins() -> list[XiaozhiPinRecord]:
    return [_xiaozhi_pin(row) for row in await XiaozhiPin.all().order_by("id").prefetch_related("package")]


async def delete_xiaozhi_pin(pin_id: int) -> bool:
    return await XiaozhiPin.filter(id=pin_id).delete() > 0


# --- upgrades ---

def _upgrade(row: Upgrade, device_name: str) -> UpgradeRecord:
    return UpgradeRecord(id=row.id, version=row.version, device_name=device_name, package_id=row.package_id,
                         file_name=row.file_name, md5=row.md5, state=row.state, created_at=row.created_at,
                         updated_at=row.updated_at, progress=row.progress, message=row.message,
                         timeout_at=row.timeout_at, finished_at=row.finished_at, campaign_id=row.campaign_id,
                         stage=row.stage)


async def record_upgrade(*, version: str, device_id: int, package: PackageRecord, state: str, at: datetime,
                         timeout_at: datetime | None, superseded_state: str, open_states: Iterable[str],
                         campaign_id: int | None = None, stage: int | None = None) -> None:
    """Insert a new upgrade and mark the device's earlier open upgrades superseded, in one
    transaction, with their timeline entries."""
    async with in_transaction():
        earlier = await Upgrade.filter(device_id=device_id, state__in=list(open_states))
        if earlier:
            await Upgrade.filter(id__in=[row.id for row in earlier]).update(state=superseded_state, finished_at=at)
            await UpgradeEvent.bulk_create([UpgradeEvent(upgrade_id=row.id, at=at, state=superseded_state,
                                                         source="server", detail=f"superseded by {version}")
                                            for row in earlier])
        row = await Upgrade.create(version=version, device_id=device_id, package_id=package.id,
                                   file_name=package.file_name, md5=package.md5, state=state, timeout_at=timeout_at,
                                   campaign_id=campaign_id, stage=stage)
        await UpgradeEvent.create(upgrade_id=row.id, at=at, state=state, source="server", detail=None)


async def advance_upgrade(version: str, from_state: str, to_state: str, at: datetime, source: str = "server",
                          detail: str | None = None, *, progress: int | None = None, message: str | None = None,
                          finished: bool = False) -> bool:
    """Move an upgrade from ``from_state`` to ``to_state`` only if it is still in ``from_state`` (a
    concurrent change may have moved it meanwhile), with its timeline entry. True if it moved."""
    changes: dict = {"state": to_state}
    if progress is not None:
        changes["progress"] = progress
    if message is not None:
        changes["message"] = message
    if finished:
        changes["finished_at"] = at
    async with in_transaction():
        row = await Upgrade.get_or_none(version=version, state=from_state)
        if row is None:
            return False
        await Upgrade.filter(id=row.id, state=from_state).update(**changes)
        await UpgradeEvent.create(upgrade_id=row.id, at=at, state=to_state, source=source, detail=detail)
    return True


async def note_upgrade_event(version: str, at: datetime, state: str, source: str, detail: str | None) -> None:
    """A timeline entry that does not change the state (a duplicate or late report)."""
    row = await Upgrade.get_or_none(version=version)
    if row is not None:
        await UpgradeEvent.create(upgrade_id=row.id, at=at, state=state, source=source, detail=detail)


async def find_upgrade(version: str) -> UpgradeRecord | None:
    row = await Upgrade.get_or_none(version=version).prefetch_related("device")
    return _upgrade(row, row.device.name) if row else None


async def upgrade_events(version: str) -> list[UpgradeEventRecord]:
    rows = await UpgradeEvent.filter(upgrade__version=version).order_by("id")
    return [UpgradeEventRecord(at=row.at, state=row.state, source=row.source, detail=row.detail) for row in rows]


async def list_upgrades(*, device_name: str | None, state: str | None, campaign_id: int | None, offset: int,
                        limit: int) -> tuple[list[UpgradeRecord], int]:
    query = Upgrade.all()
    if campaign_id is not None:
        query = query.filter(campaign_id=campaign_id)
    if device_name:
        query = query.filter(device__name=device_name)
    if state:
        query = query.filter(state=state)
    total = await query.count()
    rows = await query.order_by("-id").offset(offset).limit(limit).prefetch_related("device")
    return [_upgrade(row, row.device.name) for row in rows], total


async def due_upgrades(now: datetime, open_states: Iterable[str]) -> list[UpgradeRecord]:
    rows = await Upgrade.filter(state__in=list(open_states), timeout_at__lte=now).prefetch_related("device")
    return [_upgrade(row, row.device.name) for row in rows]


async def open_upgrade_of(device_name: str, open_states: Iterable[str]) -> UpgradeRecord | None:
    row = await (Upgrade.filter(device__name=device_name, state__in=list(open_states)).order_by("-id").first()
                 .prefetch_related("device"))
    return _upgrade(row, row.device.name) if row else None


async def open_upgrades(open_states: Iterable[str]) -> list[UpgradeRecord]:
    """Every upgrade in one of ``open_states``, oldest first, with its device's name."""
    rows = await Upgrade.filter(state__in=list(open_states)).order_by("id").prefetch_related("device")
    return [_upgrade(row, row.device.name) for row in rows]


async def set_firmware_version(device_id: int, firmware_version: str) -> None:
    await Device.filter(id=device_id).update(firmware_version=firmware_version)


async def mark_all_offline() -> None:
    await Device.filter(online=True).update(online=False)


async def save_presence(presence: dict[str, tuple[bool, datetime]]) -> None:
    """Write devices' online flag and last-seen time, batched by the caller."""
    async with in_transaction():
        for name, (online, last_seen) in presence.items():
            await Device.filter(name=name).update(online=online, last_seen=last_seen)


async def close_upgrades_of_package(package_id: int, open_states: Iterable[str], state: str,
                                    at: datetime) -> list[str]:
    """Set the open upgrades of a package to ``state``; return the affected device names."""
    async with in_transaction():
        rows = await Upgrade.filter(package_id=package_id, state__in=list(open_states)).prefetch_related("device")
        await Upgrade.filter(id__in=[row.id for row in rows]).update(state=state, finished_at=at)
        await UpgradeEvent.bulk_create([UpgradeEvent(upgrade_id=row.id, at=at, state=state, source="admin",
                                                     detail="package deleted") for row in rows])
    return [row.device.name for row in rows]


# --- campaigns ---

def _campaign(row: Campaign) -> CampaignRecord:
    return CampaignRecord(id=row.id, name=row.name, product_id=row.product_id, package_id=row.package_id,
                          stages=json.loads(row.stages), success_threshold=row.success_threshold,
                          failure_threshold=row.failure_threshold, max_concurrent=row.max_concurrent,
                          notify_rate=row.notify_rate, timeout=row.timeout, state=row.state,
                          current_stage=row.current_stage, reason=row.reason, created_at=row.created_at,
                          failures_accepted=row.failures_accepted)


async def insert_campaign(**fields_) -> CampaignRecord:
    fields_["stages"] = json.dumps(fields_["stages"])
    return _campaign(await Campaign.create(**fields_))


async def find_campaign(campaign_id: int) -> CampaignRecord | None:
    row = await Campaign.get_or_none(id=campaign_id)
    return _campaign(row) if row else None


async def list_campaigns(states: Iterable[str] | None = None) -> list[CampaignRecord]:
    query = Campaign.all() if states is None else Campaign.filter(state__in=list(states))
    return [_campaign(row) for row in await query.order_by("id")]


async def update_campaign(campaign_id: int, from_states: Iterable[str], **changes) -> bool:
    """Change a campaign only if it is still in one of ``from_states``."""
    return await Campaign.filter(id=campaign_id, state__in=list(from_states)).update(**changes) > 0


async def device_names_of_product(product_id: int) -> list[tuple[int, str]]:
    return [(row[0], row[1]) for row in await Device.filter(product_id=product_id).values_list("id", "name")]


async def end_open_upgrades_of_campaign(campaign_id: int, open_states: Iterable[str], state: str, at: datetime,
                                        detail: str) -> list[str]:
    """Move every open upgrade of a campaign to ``state`` in one statement, whatever open state
    each has reached by now; return the devices whose command must be withdrawn."""
    async with in_transaction():
        rows = await Upgrade.filter(campaign_id=campaign_id, state__in=list(open_states)).prefetch_related("device")
        await Upgrade.filter(id__in=[row.id for row in rows], state__in=list(open_states)).update(
            state=state, finished_at=at)
        await UpgradeEvent.bulk_create([UpgradeEvent(upgrade_id=row.id, at=at, state=state, source="admin",
                                                     detail=detail) for row in rows])
    return [row.device.name for row in rows]


async def campaign_upgrades(campaign_id: int) -> list[UpgradeRecord]:
    rows = await Upgrade.filter(campaign_id=campaign_id).order_by("id").prefetch_related("device")
    return [_upgrade(row, row.device.name) for row in rows]


async def count_upgrades_by_state(campaign_id: int | None = None) -> dict[str, int]:
    query = Upgrade.all() if campaign_id is None else Upgrade.filter(campaign_id=campaign_id)
    rows = await query.annotate(n=Count("id")).group_by("state").values("state", "n")
    return {row["state"]: row["n"] for row in rows}


async def database_alive() -> bool:
    await Device.all().limit(1).values_list("id", flat=True)
    return True
