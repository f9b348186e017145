"""The fleet at a glance and devices found by what they are: the dashboard's read side. Every
answer is counted or paged by the database (the store's ``fleet`` queries)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from otad.errors import InvalidInput
from otad.service.campaigns import Campaigns, CampaignStatus
from otad.service.devices import DeviceRegistry
from otad.model import (LIVE_CAMPAIGN_STATES, OPEN_STATES, UNKNOWN_VERSION, DeviceRecord, PassivePinRecord,
                        ProductCount, UpgradeEventRecord, UpgradeRecord, UpgradeState, VersionCount)
from otad.service.upgrades import UpgradeService
from otad.service.validation import parse_int

__all__ = ["DevicePage", "Fleet", "Overview", "ProductCount", "UNKNOWN_VERSION", "VersionCount"]

VERSIONS_SHOWN = 12
MAX_PAGE_SIZE = 200


@dataclass(frozen=True)
class Overview:
    products: list[ProductCount]
    versions: list[VersionCount]
    upgrades: dict[str, int]  # state -> how many, every state present
    campaigns: list[CampaignStatus]  # running and paused

    @property
    def devices(self) -> int:
        return sum(product.devices for product in self.products)

    @property
    def online(self) -> int:
        return sum(product.online for product in self.products)


@dataclass(frozen=True)
class DevicePage:
    items: list[DeviceRecord]
    open_upgrades: dict[str, tuple[str, str]]  # device name -> (version, state) of its open upgrade
    total: int
    page: int
    page_size: int


def _online_filter(raw: object) -> bool | None:
    if raw in (None, "", "any"):
        return None
    if raw in ("yes", "true", "1", "online"):
        return True
    if raw in ("no", "false", "0", "offline"):
        return False
    raise InvalidInput("参数无效: online must be yes or no")


class Fleet:
    def __init__(self, store, devices: DeviceRegistry, upgrades: UpgradeService, campaigns: Campaigns) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._devices = devices
        self._upgrades = upgrades
        self._campaigns = campaigns

    async def overview(self) -> Overview:
        await self._devices.flush_presence()  # connects of the last seconds count too
        campaigns = [await self._campaigns.status(campaign.id) for campaign in await self._campaigns.list()
                     if campaign.state in LIVE_CAMPAIGN_STATES]
        counts = await self._upgrades.counts_by_state()
        return Overview(products=await self._store.fleet.devices_per_product(),
                        versions=await self._store.fleet.firmware_versions(VERSIONS_SHOWN),
                        upgrades={state: counts.get(state, 0) for state in UpgradeState}, campaigns=campaigns)

    async def live_summary(self, changed_campaigns: set[int]) -> dict[str, Any]:
        """What a live screen shows beside the changes: fleet counts and the progress of the
        campaigns that moved."""
        await self._devices.flush_presence()
        products = await self._store.fleet.devices_per_product()
        counts = await self._upgrades.counts_by_state()
        campaigns = {}
        for campaign_id in sorted(changed_campaigns):
            status = await self._campaigns.status(campaign_id)
            campaigns[str(campaign_id)] = {
                "state": status.campaign.state, "stage": status.campaign.current_stage + 1,
                "states": dict(status.by_state), "devices": sum(status.devices_per_stage.values()),
                "stages": [{"devices": status.devices_per_stage[index], "states": dict(status.by_stage.get(index, Counter()))}
                           for index in range(len(status.campaign.stages))],
            }
        return {"summary": {"devices": sum(p.devices for p in products), "online": sum(p.online for p in products),
                            "products": {str(p.product_id): {"devices": p.devices, "online": p.online} for p in products},
                            "upgrades": {state: counts.get(state, 0) for state in UpgradeState}},
                "campaigns": campaigns}

    async def devices(self, *, text: object = None, product_id: object = None, online: object = None,
                      version: object = None, page: object = None, page_size: object = None) -> DevicePage:
        """One page of devices matching the filters (each optional): part of the name, product,
        online or not, reported firmware version ("" for never reported)."""
        if text is not None and not isinstance(text, str):
            raise InvalidInput("参数无效: search text")
        number = 1 if page in (None, "") else min(max(parse_int(page, "page"), 1), 1_000_000)
        size = 50 if page_size in (None, "") else min(max(parse_int(page_size, "pageSize"), 1), MAX_PAGE_SIZE)
        product = None if product_id in (None, "") else parse_int(product_id, "productId")
        await self._devices.flush_presence()
        items, total = await self._store.fleet.search_devices(
            text=(text or "").strip()[:128] or None, product_id=product, online=_online_filter(online),
            version=None if version is None else str(version)[:128], offset=(number - 1) * size, limit=size)
        open_upgrades = await self._store.fleet.open_upgrade_versions([device.name for device in items], list(OPEN_STATES))
        return DevicePage(items=items, open_upgrades=open_upgrades, total=total, page=number, page_size=size)

    async def product_ids(self) -> list[int]:
        return await self._store.fleet.product_ids()

    async def device(self, name: object) -> DeviceRecord:
        """One device as it is now (connects of the last seconds included); NotFound if unknown."""
        await self._devices.flush_presence()
        return await self._devices.get(name)

    async def timelines(self, upgrades: list[UpgradeRecord]) -> dict[str, list[UpgradeEventRecord]]:
        """upgrade version -> its whole timeline, for the upgrades of one page (one query)."""
        by_id = await self._store.fleet.upgrade_timelines([upgrade.id for upgrade in upgrades])
        return {upgrade.version: by_id[upgrade.id] for upgrade in upgrades}

    async def passive_pin_of(self, device_name: str) -> PassivePinRecord | None:
        """The passive package pinned for the device, if any (a read; the poll cache is the pins')."""
        return await self._store.repo.find_passive_pin(device_name)
