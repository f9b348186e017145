"""Repository functions for upgrades (with their timelines) and campaigns."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime

from tortoise.functions import Count
from tortoise.transactions import in_transaction

from otad.store.models import Campaign, Upgrade, UpgradeEvent
from otad.store.records import CampaignRecord, PackageRecord, UpgradeEventRecord, UpgradeRecord


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


async def end_open_upgrades(*, open_states: Iterable[str], state: str, at: datetime, detail: str,
                            package_id: int | None = None, campaign_id: int | None = None) -> list[str]:
    """Move every open upgrade of a package or of a campaign to ``state`` in one transaction,
    whatever open state each has reached by now, with its timeline entry; return the devices whose
    command must be withdrawn."""
    scope = {"package_id": package_id} if package_id is not None else {"campaign_id": campaign_id}
    async with in_transaction():
        rows = await Upgrade.filter(**scope, state__in=list(open_states)).prefetch_related("device")
        await Upgrade.filter(id__in=[row.id for row in rows], state__in=list(open_states)).update(
            state=state, finished_at=at)
        await UpgradeEvent.bulk_create([UpgradeEvent(upgrade_id=row.id, at=at, state=state, source="admin",
                                                     detail=detail) for row in rows])
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


async def campaign_upgrades(campaign_id: int) -> list[UpgradeRecord]:
    rows = await Upgrade.filter(campaign_id=campaign_id).order_by("id").prefetch_related("device")
    return [_upgrade(row, row.device.name) for row in rows]


async def count_upgrades_by_state(campaign_id: int | None = None) -> dict[str, int]:
    query = Upgrade.all() if campaign_id is None else Upgrade.filter(campaign_id=campaign_id)
    rows = await query.annotate(n=Count("id")).group_by("state").values("state", "n")
    return {row["state"]: row["n"] for row in rows}
