"""How records look in JSON replies: the contract's camelCase keys."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from otad.service import (CampaignRecord, DeviceRecord, PackageRecord, PassivePinRecord, UpgradeEventRecord,
                          UpgradeRecord, XiaozhiPinRecord)
from otad.service.campaigns import CampaignStatus
from otad.service.devices import NewDevice


def timestamp(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def package_view(package: PackageRecord) -> dict[str, Any]:
    return {
        "id": package.id,
        "name": package.name,
        "productId": package.product_id,
        "fileName": package.file_name,
        "path": package.file_name,  # the original platform's row has "path"; we never expose disk paths
        "originalName": package.original_name,
        "size": package.size,
        "md5": package.md5,
        "sha256": package.sha256,
        "version": package.version,
        "description": package.description,
        "createdAt": timestamp(package.created_at),
    }


def enabled_view(package: PackageRecord, version: str) -> dict[str, Any]:
    """One row of otaEnable's reply: the original's package row plus this upgrade's version."""
    return {"id": package.id, "path": package.file_name, "name": package.name, "productId": package.product_id,
            "fileName": package.file_name, "md5": package.md5, "version": version}


def device_view(device: DeviceRecord) -> dict[str, Any]:
    inventory = device.inventory
    return {
        "id": device.id, "deviceName": device.name, "productId": device.product_id,
        "createdAt": timestamp(device.created_at),
        # What the device last reported (xiaozhi boards, on each OTA check).
        "appVersion": inventory.app_version, "boardType": inventory.board_type,
        "boardName": inventory.board_name, "chip": inventory.chip, "elfSha256": inventory.elf_sha256,
        "remoteAddr": inventory.remote_addr, "lastCheckAt": timestamp(inventory.last_check_at),
        # From its OTA reports and its MQTT connection.
        "firmwareVersion": device.firmware_version, "online": device.online,
        "lastSeen": timestamp(device.last_seen),
    }


def new_device_view(device: NewDevice) -> dict[str, Any]:
    return {"deviceName": device.name, "productId": device.product_id, "password": device.password}


def passive_pin_saved_view(pin: PassivePinRecord) -> dict[str, Any]:
    """The reply to a pin, as the original: ``{"id","otaId","deviceId","versionName","description"}``."""
    return {"id": pin.id, "otaId": pin.package.id, "deviceId": pin.device_id, "versionName": pin.version_name,
            "description": pin.description}


def passive_pin_view(pin: PassivePinRecord) -> dict[str, Any]:
    return {**passive_pin_saved_view(pin), "otaName": pin.package.name, "deviceName": pin.device_name}


def xiaozhi_pin_saved_view(pin: XiaozhiPinRecord) -> dict[str, Any]:
    return {"id": pin.id, "otaId": pin.package.id, "productId": pin.product_id, "versionName": pin.version_name,
            "force": pin.force}


def xiaozhi_pin_view(pin: XiaozhiPinRecord) -> dict[str, Any]:
    # otad keeps no product registry, so the original's productName has no value to show.
    return {**xiaozhi_pin_saved_view(pin), "otaName": pin.package.name, "productName": None}


def upgrade_view(upgrade: UpgradeRecord) -> dict[str, Any]:
    return {
        "version": upgrade.version, "deviceName": upgrade.device_name, "otaId": upgrade.package_id,
        "fileName": upgrade.file_name, "md5": upgrade.md5, "state": upgrade.state, "progress": upgrade.progress,
        "message": upgrade.message, "createdAt": timestamp(upgrade.created_at),
        "updatedAt": timestamp(upgrade.updated_at), "timeoutAt": timestamp(upgrade.timeout_at),
        "finishedAt": timestamp(upgrade.finished_at), "campaign": upgrade.campaign_id, "stage": upgrade.stage,
    }


def event_view(event: UpgradeEventRecord) -> dict[str, Any]:
    return {"at": timestamp(event.at), "state": event.state, "source": event.source, "detail": event.detail,
            "count": event.count, "lastAt": timestamp(event.last_at) if event.last_at else None,
            "changed": event.changed}


def campaign_view(campaign: CampaignRecord) -> dict[str, Any]:
    return {
        "id": campaign.id, "name": campaign.name, "productId": campaign.product_id, "otaId": campaign.package_id,
        "stages": campaign.stages, "successThreshold": campaign.success_threshold,
        "failureThreshold": campaign.failure_threshold, "maxConcurrent": campaign.max_concurrent,
        "notifyRate": campaign.notify_rate, "timeout": campaign.timeout, "state": campaign.state,
        "currentStage": campaign.current_stage + 1, "reason": campaign.reason,
        "createdAt": timestamp(campaign.created_at),
    }


def campaign_status_view(status: CampaignStatus) -> dict[str, Any]:
    stages = []
    for index, percent in enumerate(status.campaign.stages):
        stages.append({"stage": index + 1, "percent": percent, "devices": status.devices_per_stage[index],
                       "states": dict(status.by_stage.get(index, {}))})
    return {**campaign_view(status.campaign), "states": dict(status.by_state), "stageProgress": stages}
