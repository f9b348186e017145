"""Plain records the store hands to the service, so no ORM object leaves ``otad.store``."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# The longest version text a device may report (``currentVersion``) and the column that keeps it:
# one number for the validation and the schema, so what passes the one fits the other.
MAX_VERSION_TEXT = 128


@dataclass(frozen=True)
class TokenRecord:
    name: str
    kind: str
    created_at: datetime
    expires_at: datetime | None
    role: str = "admin"


@dataclass(frozen=True)
class UserRecord:
    id: int
    username: str
    password_hash: str
    role: str = "admin"
    created_at: datetime | None = None


@dataclass(frozen=True)
class Inventory:
    """What a device last reported about itself."""

    app_version: str | None = None
    board_type: str | None = None
    board_name: str | None = None
    chip: str | None = None
    elf_sha256: str | None = None
    remote_addr: str | None = None
    last_check_at: datetime | None = None


@dataclass(frozen=True)
class DeviceRecord:
    id: int
    name: str
    product_id: int
    password_hash: str
    created_at: datetime
    inventory: Inventory
    firmware_version: str | None = None  # as the device last reported it
    online: bool = False
    last_seen: datetime | None = None


@dataclass(frozen=True)
class PackageRecord:
    id: int
    product_id: int
    name: str
    file_name: str
    original_name: str
    size: int
    md5: str
    sha256: str
    version: str | None
    description: str | None
    created_at: datetime


@dataclass(frozen=True)
class UpgradeRecord:
    id: int
    version: str
    device_name: str
    package_id: int | None
    file_name: str
    md5: str
    state: str
    created_at: datetime
    updated_at: datetime | None = None
    progress: int | None = None
    message: str | None = None
    timeout_at: datetime | None = None
    finished_at: datetime | None = None
    campaign_id: int | None = None
    stage: int | None = None


@dataclass(frozen=True)
class UpgradeEventRecord:
    at: datetime
    state: str
    source: str
    detail: str | None
    count: int = 1  # consecutive reports of this status folded into this entry
    last_at: datetime | None = None  # when the last of them arrived (None: only one)
    changed: bool = True  # this entry moved the upgrade's state


@dataclass(frozen=True)
class PassivePinRecord:
    id: int
    device_id: int
    device_name: str
    package: PackageRecord
    version_name: str
    description: str | None


@dataclass(frozen=True)
class XiaozhiPinRecord:
    id: int
    product_id: int
    package: PackageRecord
    version_name: str
    force: bool


@dataclass(frozen=True)
class CampaignRecord:
    id: int
    name: str
    product_id: int
    package_id: int | None
    stages: list[int]
    success_threshold: float
    failure_threshold: float
    max_concurrent: int
    notify_rate: float
    timeout: float
    state: str
    current_stage: int
    reason: str | None
    created_at: datetime
    failures_accepted: int = 0
