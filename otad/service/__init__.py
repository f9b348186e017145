"""The OTA use cases. Nothing here knows about HTTP, MQTT, the CLI or the ORM."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from otad.firmware import FirmwareStore
from otad.service.admins import AdminAuth
from otad.service.campaigns import Campaigns
from otad.service.delta_bases import BaseImages
from otad.service.deltas import DeltaCatalog, DeltaOffers
from otad.service.chunks import FirmwareChunks
from otad.service.devices import DeviceRegistry
from otad.service.fleet import Fleet
from otad.service.health import StorageHealth
from otad.service.ingest import ReportIngest
from otad.service.live import LiveFeed
from otad.service.login_guard import DEFAULT_MAX_FAILURES, DEFAULT_WINDOW, LoginGuard
from otad.service.offers import Offers
from otad.service.packages import PackageCatalog
from otad.service.pins import PassivePins
from otad.service.reports import Reports
from otad.service.ports import DeviceCredentials, Publisher
from otad.service.clock import utc_now
from otad.service.upgrades import UpgradeService
from otad.service.xiaozhi import XiaozhiBoards
# The records the use cases return, for the adapters to render (otad.model: plain data).
from otad.model import (CampaignRecord, DeviceRecord, PackageRecord, PassivePinRecord, UpgradeEventRecord,
                        UpgradeRecord, XiaozhiPinRecord)

__all__ = ["CampaignRecord", "DeviceRecord", "PackageRecord", "PassivePinRecord", "Services", "UpgradeEventRecord", "UpgradeRecord",
           "XiaozhiPinRecord", "build_services"]


@dataclass(frozen=True)
class Services:
    """Every use case, built once by the composition root and handed to the adapters."""

    admins: AdminAuth
    devices: DeviceRegistry
    packages: PackageCatalog
    upgrades: UpgradeService
    campaigns: Campaigns
    reports: Reports
    ingest: ReportIngest
    health: StorageHealth
    passive: PassivePins
    xiaozhi: XiaozhiBoards
    firmware: FirmwareStore
    fleet: Fleet
    live: LiveFeed
    chunks: FirmwareChunks
    offers: Offers  # what commands and passive replies say beyond the seed's keys
    deltas: DeltaCatalog  # delta patches between a product's packages (issue 14)


def build_services(store, firmware: FirmwareStore, publisher: Publisher, max_upload_size: int,
                   xiaozhi_default_product_id: int | None = None, upgrade_timeout: float = 24 * 3600,
                   clock: Callable[[], datetime] = utc_now, timeline_limit: int = 100,
                   login_max_failures: int = DEFAULT_MAX_FAILURES, login_window: float = DEFAULT_WINDOW,
                   accounts: DeviceCredentials | None = None, chunk_max_size: int = 32 * 1024,
                   chunk_transfers_per_device: int = 2, delta_scratch_dir: Path | None = None,
                   auto_delta: bool = False) -> Services:
    """``store`` is the composition root's ``otad.store.store.Store``: each use case keeps it and
    reaches the database only through it."""
    devices = DeviceRegistry(store, publisher, accounts)
    offers = Offers()  # the composition root adds the optional parts (deltas, signatures)
    bases = BaseImages(store, firmware)  # which image a version names, for offering patches
    offers.add(DeltaOffers(store, bases))  # first: a signature added after it covers the delta too
    upgrades = UpgradeService(store, devices, publisher, upgrade_timeout, clock, offers)
    health = StorageHealth(store)
    reports = Reports(store, upgrades, timeline_limit)
    campaigns = Campaigns(store, upgrades, devices, upgrade_timeout)
    fleet = Fleet(store, devices, upgrades, campaigns)
    live = LiveFeed(fleet.live_summary)
    upgrades.on_change(live.upgrades_changed)
    devices.on_presence(live.presence_changed)
    campaigns.on_change(live.campaign_changed)
    packages = PackageCatalog(store, firmware, upgrades, max_upload_size, health)
    passive = PassivePins(store, devices, offers, clock)
    packages.on_delete(bases.forget)
    # A cached passive reply may name a patch to or from the deleted package, or from the version a
    # device ran before its report.
    packages.on_delete(lambda _file_name: passive.forget())
    reports.on_version(passive.version_reported)
    deltas = DeltaCatalog(store, firmware, packages, bases, delta_scratch_dir or Path("delta-work"), auto_delta)
    deltas.on_change(passive.forget)  # a cached passive reply may now carry a delta
    return Services(
        admins=AdminAuth(store, guard=LoginGuard(login_max_failures, login_window)),
        devices=devices,
        packages=packages,
        upgrades=upgrades,
        campaigns=campaigns,
        reports=reports,
        ingest=ReportIngest(reports, health),
        health=health,
        passive=passive,
        xiaozhi=XiaozhiBoards(store, xiaozhi_default_product_id, patches=bases),
        firmware=firmware,
        fleet=fleet,
        live=live,
        chunks=FirmwareChunks(packages, upgrades, passive, reports, firmware, chunk_max_size, chunk_transfers_per_device,
                              deltas=deltas),
        offers=offers,
        deltas=deltas,
    )
