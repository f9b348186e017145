"""Repository functions for upgrades (with their timelines) and campaigns."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime

from tortoise.functions import Count
from tortoise.transactions import in_transaction

from otad.store.models import Campaign, Device, Upgrade, UpgradeEvent
from otad.store.transactions import shielded
from otad.model import (CampaignRecord, CampaignUpgrade, EndedUpgrade, NewUpgrade, PackageRecord, UpgradeEventRecord,
                        UpgradeRecord)


# --- upgrades ---

def _upgrade(row: Upgrade, device_name: str) -> UpgradeRecord:
    return UpgradeRecord(id=row.id, version=row.version, device_name=device_name, package_id=row.package_id,
                         file_name=row.file_name, md5=row.md5, state=row.state, created_at=row.created_at,
                         updated_at=row.updated_at, progress=row.progress, message=row.message,
                         timeout_at=row.timeout_at, finished_at=row.finished_at, campaign_id=row.campaign_id,
                         stage=row.stage)


# --- campaigns ---

def _campaign(row: Campaign) -> CampaignRecord:
    return CampaignRecord(id=row.id, name=row.name, product_id=row.product_id, package_id=row.package_id,
                          stages=json.loads(row.stages), success_threshold=row.success_threshold,
                          failure_threshold=row.failure_threshold, max_concurrent=row.max_concurrent,
                          notify_rate=row.notify_rate, timeout=row.timeout, state=row.state,
                          current_stage=row.current_stage, reason=row.reason, created_at=row.created_at,
                          failures_accepted=row.failures_accepted)


class Rollouts:
    """Upgrades (with their timelines) and campaigns."""

    @shielded
    async def record_upgrades(self, new: list[NewUpgrade], *, package: PackageRecord, state: str, at: datetime,
                              superseded_state: str, open_states: Iterable[str],
                              campaign_id: int | None = None) -> list[EndedUpgrade]:
        """Insert new upgrades (one per device) and mark those devices' earlier open upgrades
        superseded, in one transaction, with their timeline entries; return what was superseded."""
        if not new:
            return []
        async with in_transaction():
            # PostgreSQL runs writers side by side (SQLite one at a time): locking the devices first
            # makes two enables of one device take turns, so the second sees and supersedes the first.
            await Device.filter(id__in=[item.device_id for item in new]).order_by("id").select_for_update().only("id")
            earlier = await Upgrade.filter(device_id__in=[item.device_id for item in new],
                                           state__in=list(open_states)).prefetch_related("device")
            if earlier:
                await Upgrade.filter(id__in=[row.id for row in earlier], state__in=list(open_states)).update(
                    state=superseded_state, finished_at=at, updated_at=at)
                replaced_by = {item.device_id: item.version for item in new}
                await UpgradeEvent.bulk_create([UpgradeEvent(upgrade_id=row.id, at=at, state=superseded_state,
                                                             source="server",
                                                             detail=f"superseded by {replaced_by[row.device_id]}")
                                                for row in earlier])
            await Upgrade.bulk_create([Upgrade(version=item.version, device_id=item.device_id, package_id=package.id,
                                               file_name=package.file_name, md5=package.md5, state=state,
                                               timeout_at=item.timeout_at, campaign_id=campaign_id, stage=item.stage,
                                               created_at=at, updated_at=at) for item in new])
            ids = dict(await Upgrade.filter(version__in=[item.version for item in new]).values_list("version", "id"))
            await UpgradeEvent.bulk_create([UpgradeEvent(upgrade_id=ids[item.version], at=at, state=state,
                                                         source="server", detail=None) for item in new])
        return [EndedUpgrade(row.version, row.device.name, row.campaign_id, row.state) for row in earlier]

    @shielded
    async def advance_upgrade(self, version: str, from_state: str, to_state: str, at: datetime, source: str = "server",
                              detail: str | None = None, *, progress: int | None = None, message: str | None = None,
                              finished: bool = False) -> bool:
        """Move an upgrade from ``from_state`` to ``to_state`` only if it is still in ``from_state`` (a
        concurrent change may have moved it meanwhile), with its timeline entry. True if it moved."""
        changes: dict = {"state": to_state, "updated_at": at}
        if progress is not None:
            changes["progress"] = progress
        if message is not None:
            changes["message"] = message
        if finished:
            changes["finished_at"] = at
        async with in_transaction():
            row = await Upgrade.get_or_none(version=version, state=from_state).only("id")
            # Compare-and-set: the update counts, so of two concurrent transitions only one wins.
            if row is None or not await Upgrade.filter(id=row.id, state=from_state).update(**changes):
                return False
            await UpgradeEvent.create(upgrade_id=row.id, at=at, state=to_state, source=source, detail=detail)
        return True

    @shielded
    async def advance_upgrades(self, versions: list[str], from_state: str, to_state: str, at: datetime) -> int:
        """``advance_upgrade`` for many upgrades at once (no detail); returns how many moved."""
        if not versions:
            return 0
        async with in_transaction():
            # Locked as read (PostgreSQL): no other writer moves them between this and the update.
            ids = [row.id for row in await Upgrade.filter(version__in=versions, state=from_state)
                   .order_by("id").select_for_update().only("id")]
            moved = await Upgrade.filter(id__in=list(ids), state=from_state).update(state=to_state, updated_at=at)
            if moved != len(ids):
                raise RuntimeError("upgrades moved while being advanced")  # rolls back; the caller retries
            await UpgradeEvent.bulk_create([UpgradeEvent(upgrade_id=upgrade_id, at=at, state=to_state, source="server",
                                                         detail=None) for upgrade_id in ids])
        return moved

    async def find_upgrade(self, version: str) -> UpgradeRecord | None:
        row = await Upgrade.get_or_none(version=version).prefetch_related("device")
        return _upgrade(row, row.device.name) if row else None

    async def upgrade_events(self, upgrade_id: int, offset: int, limit: int) -> tuple[list[UpgradeEventRecord], int]:
        """One page of an upgrade's timeline, oldest first, and how many entries it has."""
        query = UpgradeEvent.filter(upgrade_id=upgrade_id)
        total = await query.count()
        rows = await query.order_by("id").offset(offset).limit(limit)
        return [UpgradeEventRecord(at=row.at, state=row.state, source=row.source, detail=row.detail, count=row.count,
                                   last_at=row.last_at, changed=row.changed) for row in rows], total

    async def list_upgrades(self, *, device_name: str | None, state: str | None, campaign_id: int | None, offset: int,
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

    async def due_upgrades(self, now: datetime, open_states: Iterable[str]) -> list[UpgradeRecord]:
        rows = await Upgrade.filter(state__in=list(open_states), timeout_at__lte=now).prefetch_related("device")
        return [_upgrade(row, row.device.name) for row in rows]

    async def open_upgrade_of(self, device_name: str, open_states: Iterable[str]) -> UpgradeRecord | None:
        row = await (Upgrade.filter(device__name=device_name, state__in=list(open_states)).order_by("-id").first()
                     .prefetch_related("device"))
        return _upgrade(row, row.device.name) if row else None

    async def open_upgrades(self, open_states: Iterable[str]) -> list[UpgradeRecord]:
        """Every upgrade in one of ``open_states``, oldest first, with its device's name."""
        rows = await Upgrade.filter(state__in=list(open_states)).order_by("id").prefetch_related("device")
        return [_upgrade(row, row.device.name) for row in rows]

    @shielded
    async def end_open_upgrades(self, *, open_states: Iterable[str], state: str, at: datetime, detail: str,
                                package_id: int | None = None, campaign_id: int | None = None) -> list[EndedUpgrade]:
        """Move every open upgrade of a package or of a campaign to ``state`` in one transaction,
        whatever open state each has reached by now, with its timeline entry; return what ended."""
        scope = {"package_id": package_id} if package_id is not None else {"campaign_id": campaign_id}
        async with in_transaction():
            rows = await (Upgrade.filter(**scope, state__in=list(open_states)).order_by("id").select_for_update()
                          .prefetch_related("device"))
            moved = await Upgrade.filter(id__in=[row.id for row in rows], state__in=list(open_states)).update(
                state=state, finished_at=at, updated_at=at)
            if moved != len(rows):
                raise RuntimeError("upgrades moved while being ended")  # rolls back; the caller may retry
            await UpgradeEvent.bulk_create([UpgradeEvent(upgrade_id=row.id, at=at, state=state, source="admin",
                                                         detail=detail) for row in rows])
        return [EndedUpgrade(row.version, row.device.name, row.campaign_id, row.state) for row in rows]

    async def insert_campaign(self, **fields_) -> CampaignRecord:
        fields_["stages"] = json.dumps(fields_["stages"])
        return _campaign(await Campaign.create(**fields_))

    async def find_campaign(self, campaign_id: int) -> CampaignRecord | None:
        row = await Campaign.get_or_none(id=campaign_id)
        return _campaign(row) if row else None

    async def list_campaigns(self, states: Iterable[str] | None = None) -> list[CampaignRecord]:
        query = Campaign.all() if states is None else Campaign.filter(state__in=list(states))
        return [_campaign(row) for row in await query.order_by("id")]

    async def update_campaign(self, campaign_id: int, from_states: Iterable[str], **changes) -> bool:
        """Change a campaign only if it is still in one of ``from_states``."""
        return await Campaign.filter(id=campaign_id, state__in=list(from_states)).update(**changes) > 0

    async def campaign_upgrade_states(self, campaign_id: int) -> list[CampaignUpgrade]:
        """Each device's latest upgrade in the campaign, with its state."""
        rows = await Upgrade.filter(campaign_id=campaign_id).order_by("id").values_list("device__name", "version", "state")
        return [CampaignUpgrade(*row) for row in rows]

    async def count_campaign_upgrades(self, campaign_id: int) -> list[tuple[int | None, str, int]]:
        """(stage, state, how many) for a campaign's upgrades, counted by the database."""
        rows = await Upgrade.filter(campaign_id=campaign_id).annotate(n=Count("id")).group_by("stage", "state").values(
            "stage", "state", "n")
        return [(row["stage"], row["state"], row["n"]) for row in rows]

    async def devices_busy_elsewhere(self, device_names: list[str], campaign_id: int, states: Iterable[str]) -> set[str]:
        """Those of ``device_names`` with an upgrade in one of ``states`` that is not the campaign's."""
        if not device_names:
            return set()
        rows = await Upgrade.filter(device__name__in=device_names, state__in=list(states)).values_list(
            "device__name", "campaign_id")
        return {name for name, owner in rows if owner != campaign_id}

    async def count_upgrades_by_state(self, campaign_id: int | None = None) -> dict[str, int]:
        query = Upgrade.all() if campaign_id is None else Upgrade.filter(campaign_id=campaign_id)
        rows = await query.annotate(n=Count("id")).group_by("state").values("state", "n")
        return {row["state"]: row["n"] for row in rows}
