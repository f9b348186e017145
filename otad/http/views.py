"""How records look in JSON replies: the contract's camelCase keys."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from otad.service.devices import NewDevice
from otad.store.records import DeviceRecord, PackageRecord


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
    return {"id": device.id, "deviceName": device.name, "productId": device.product_id,
            "createdAt": timestamp(device.created_at)}


def new_device_view(device: NewDevice) -> dict[str, Any]:
    return {"deviceName": device.name, "productId": device.product_id, "password": device.password}
