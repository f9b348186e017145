"""Read-only questions about the whole fleet, answered by the database: counts and pages, never a
whole table brought into Python (the dashboard at 10,000 devices and 100,000 upgrades)."""

from __future__ import annotations


from tortoise.expressions import Q
from tortoise.functions import Count

from otad.store.models import Device, Upgrade, UpgradeEvent
from otad.model import UNKNOWN_VERSION, DeviceRecord, ProductCount, UpgradeEventRecord, VersionCount
from otad.store.repo import device_record


def _device_filter(text: str | None, product_id: int | None, online: bool | None, version: str | None) -> Q:
    query = Q()
    if text:
        query &= Q(name__icontains=text)
    if product_id is not None:
        query &= Q(product_id=product_id)
    if online is not None:
        query &= Q(online=online)
    if version == UNKNOWN_VERSION:
        query &= Q(firmware_version__isnull=True)
    elif version is not None:
        query &= Q(firmware_version=version)
    return query


class FleetQueries:
    """Read-only questions about the whole fleet."""

    async def devices_per_product(self) -> list[ProductCount]:
        totals = await Device.all().annotate(n=Count("id")).group_by("product_id").values("product_id", "n")
        online = {row["product_id"]: row["n"] for row in
                  await Device.filter(online=True).annotate(n=Count("id")).group_by("product_id").values("product_id", "n")}
        return sorted((ProductCount(row["product_id"], row["n"], online.get(row["product_id"], 0)) for row in totals),
                      key=lambda count: count.product_id)

    async def firmware_versions(self, limit: int) -> list[VersionCount]:
        """The ``limit`` most common (product, reported version) pairs, most devices first; ties by
        product, then version, never reported first. Sorted here: SQLite puts NULL first and
        PostgreSQL last (the pairs are few: a fleet runs a handful of versions per product)."""
        rows = await (Device.all().annotate(n=Count("id")).group_by("product_id", "firmware_version")
                      .values("product_id", "firmware_version", "n"))
        rows.sort(key=lambda row: (-row["n"], row["product_id"], row["firmware_version"] is not None,
                                   row["firmware_version"] or ""))
        return [VersionCount(row["product_id"], row["firmware_version"] or UNKNOWN_VERSION, row["n"])
                for row in rows[:limit]]

    async def search_devices(self, *, text: str | None = None, product_id: int | None = None, online: bool | None = None,
                             version: str | None = None, offset: int = 0, limit: int = 50) -> tuple[list[DeviceRecord], int]:
        """One page of the devices matching every filter given (``text``: part of the name), by name,
        and how many match in all."""
        query = Device.filter(_device_filter(text, product_id, online, version))
        total = await query.count()
        rows = await query.order_by("name").offset(offset).limit(limit)
        return [device_record(row) for row in rows], total

    async def product_ids(self) -> list[int]:
        return sorted(await Device.all().distinct().values_list("product_id", flat=True))

    async def open_upgrade_versions(self, device_names: list[str], open_states: list[str]) -> dict[str, tuple[str, str]]:
        """device name -> (version, state) of its open upgrade, for the devices of one page."""
        if not device_names:
            return {}
        rows = await Upgrade.filter(device__name__in=device_names, state__in=open_states).values_list(
            "device__name", "version", "state")
        return {name: (version, state) for name, version, state in rows}

    async def upgrade_timelines(self, upgrade_ids: list[int]) -> dict[int, list[UpgradeEventRecord]]:
        """upgrade id -> its timeline, oldest first, for the upgrades of one page, in one query.
        Timelines are short (reports that changed nothing are capped per upgrade, 100 by default), so
        a page of 20 upgrades is a couple of thousand rows at the very most."""
        timelines: dict[int, list[UpgradeEventRecord]] = {upgrade_id: [] for upgrade_id in upgrade_ids}
        if not upgrade_ids:
            return timelines
        for row in await UpgradeEvent.filter(upgrade_id__in=upgrade_ids).order_by("upgrade_id", "id"):
            timelines[row.upgrade_id].append(UpgradeEventRecord(
                at=row.at, state=row.state, source=row.source, detail=row.detail, count=row.count, last_at=row.last_at,
                changed=row.changed))
        return timelines
