"""Push upgrades: enable one for a device, and bring the pending commands back after a restart."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

from otad.errors import NotFound
from otad.service.devices import DeviceRegistry
from otad.service.ports import Publisher
from otad.service.states import OPEN_STATES, UpgradeState
from otad.service.validation import check_package_name
from otad.store import repo
from otad.store.records import PackageRecord

log = logging.getLogger(__name__)


def ota_command(file_name: str, version: str, md5: str) -> bytes:
    """The command devices already parse: compact JSON, keys in exactly this order."""
    return json.dumps({"fileName": file_name, "version": version, "md5": md5}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class EnabledUpgrade:
    version: str
    device_name: str
    package: PackageRecord


class UpgradeService:
    def __init__(self, devices: DeviceRegistry, publisher: Publisher) -> None:
        self._devices = devices
        self._publisher = publisher

    async def enable(self, name: object, device_name: object) -> EnabledUpgrade:
        """Send package ``name`` of the device's product to the device, superseding earlier upgrades."""
        name = check_package_name(name)
        device = await self._devices.get(device_name)  # validates the name, NotFound if unknown
        package = await repo.find_package(device.product_id, name)
        if package is None:
            raise NotFound(f"参数无效: product {device.product_id} has no package named '{name}'")
        version = str(uuid.uuid4())
        # Recorded before it is sent: if the process dies in between, the restart sends it.
        await repo.record_upgrade(version=version, device_id=device.id, package=package,
                                  state=UpgradeState.CREATED, superseded_state=UpgradeState.SUPERSEDED,
                                  open_states=OPEN_STATES)
        await self._publisher.send_command(device.name, ota_command(package.file_name, version, package.md5))
        await repo.advance_upgrade(version, UpgradeState.CREATED, UpgradeState.NOTIFIED)
        log.info("upgrade %s: package %d '%s' enabled for device %s", version, package.id, name, device.name)
        return EnabledUpgrade(version=version, device_name=device.name, package=package)

    async def restore_pending(self) -> int:
        """Keep each device's latest open command again for its next subscribe (after a restart)."""
        latest = {upgrade.device_name: upgrade for upgrade in await repo.open_upgrades(OPEN_STATES)}
        for upgrade in latest.values():
            await self._publisher.keep_command(upgrade.device_name,
                                               ota_command(upgrade.file_name, upgrade.version, upgrade.md5))
            await repo.advance_upgrade(upgrade.version, UpgradeState.CREATED, UpgradeState.NOTIFIED)
        return len(latest)
