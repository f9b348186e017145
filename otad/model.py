"""otad's records and states: plain data the store hands to the service and the service hands to
the adapters (no ORM object leaves ``otad.store``), the states of an upgrade (with the one rule for
moving between them) and of a campaign, and the errors the store raises for the service to catch.
Both sides import this module; it imports neither."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

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


# --- states ---


class UpgradeState(StrEnum):
    CREATED = "created"          # recorded, not yet handed to the broker
    NOTIFIED = "notified"        # the command is out: delivered to a live device, or kept for its return
    DOWNLOADING = "downloading"  # the device says so, or fetched the file
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    UPDATING = "updating"
    UPDATED = "updated"          # terminal: success
    FAILED = "failed"            # terminal
    CANCELLED = "cancelled"      # terminal: by an admin, or its package was deleted
    TIMED_OUT = "timed_out"      # terminal: not finished within its timeout
    SUPERSEDED = "superseded"    # terminal: a newer upgrade for the same device replaced it


# Upgrades whose command a device should still receive.
OPEN_STATES = (UpgradeState.CREATED, UpgradeState.NOTIFIED, UpgradeState.DOWNLOADING, UpgradeState.DOWNLOADED,
               UpgradeState.VERIFIED, UpgradeState.UPDATING)
TERMINAL_STATES = (UpgradeState.UPDATED, UpgradeState.FAILED, UpgradeState.CANCELLED, UpgradeState.TIMED_OUT,
                   UpgradeState.SUPERSEDED)
# What a device may report (ThingsBoard's firmware states).
REPORTED_STATES = (UpgradeState.DOWNLOADING, UpgradeState.DOWNLOADED, UpgradeState.VERIFIED, UpgradeState.UPDATING,
                   UpgradeState.UPDATED, UpgradeState.FAILED)
_PROGRESS_ORDER = {state: rank for rank, state in enumerate(OPEN_STATES)}


def next_state(current: UpgradeState, reported: UpgradeState) -> UpgradeState | None:
    """The state after ``reported`` arrives in ``current``; None when the report changes nothing.

    Reports travel over QoS 1 and may arrive twice or out of order, so the state only moves forward:
    a late "downloading" after "verified" is kept in the timeline but does not move it back. A
    finished upgrade stays finished. "updated" and "failed" end it from any open state.
    """
    if current in TERMINAL_STATES:
        return None
    if reported in TERMINAL_STATES:
        return reported
    return reported if _PROGRESS_ORDER[reported] > _PROGRESS_ORDER[current] else None


class CampaignState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    FINISHED = "finished"


# Campaigns that may still send their package.
LIVE_CAMPAIGN_STATES = (CampaignState.RUNNING, CampaignState.PAUSED)


# --- what the store raises and takes ---

class Duplicate(Exception):
    """A row with the same unique key exists."""


class StillUsed(Exception):
    """A row cannot be deleted while others reference it."""


@dataclass(frozen=True)
class NewUpgrade:
    version: str
    device_id: int
    timeout_at: datetime | None
    stage: int | None = None


@dataclass(frozen=True)
class EndedUpgrade:
    """An open upgrade that a write ended (superseded, cancelled), as it was before."""

    version: str
    device_name: str
    campaign_id: int | None
    state: str


@dataclass(frozen=True)
class CampaignUpgrade:
    device_name: str
    version: str
    state: str


@dataclass
class ReportTarget:
    """An upgrade as a report finds it, with the tail of its timeline."""

    id: int
    version: str
    device_id: int
    device_name: str
    state: str
    progress: int | None
    campaign_id: int | None
    last_event_id: int | None = None
    last_event_state: str | None = None
    last_event_source: str | None = None
    notes: int = 0  # timeline entries kept that did not change the state


@dataclass(frozen=True)
class UpgradeWrite:
    """The net change of one upgrade in a batch: from the state it was read in to its final one."""

    id: int
    from_state: str
    to_state: str
    progress: int | None
    message: str | None
    finished_at: datetime | None
    updated_at: datetime


@dataclass
class NewEvent:
    upgrade_id: int
    at: datetime
    state: str
    source: str
    detail: str | None
    changed: bool
    count: int = 1
    last_at: datetime | None = None


@dataclass(frozen=True)
class FoldedEvent:
    """More reports of the same status folded into an existing entry."""

    event_id: int
    added: int
    last_at: datetime
    detail: str | None


@dataclass
class ReportWrites:
    upgrades: list[UpgradeWrite] = field(default_factory=list)
    new_events: list[NewEvent] = field(default_factory=list)
    folded: dict[int, FoldedEvent] = field(default_factory=dict)  # by event id
    trims: list[tuple[int, int]] = field(default_factory=list)  # (upgrade id, oldest notes to delete)
    firmware: dict[int, str] = field(default_factory=dict)  # device id -> reported currentVersion

    def __bool__(self) -> bool:
        return bool(self.upgrades or self.new_events or self.folded or self.trims or self.firmware)


@dataclass(frozen=True)
class BoardClaim:
    """What a board's check says about it, kept with its pending activation."""

    device_name: str
    client_id: str
    product_id: int
    serial_number: str | None
    remote_addr: str | None
    app_version: str | None
    board_type: str | None


@dataclass(frozen=True)
class ActivationRecord:
    id: int
    device_name: str
    client_id: str
    code: str | None  # None once accepted
    challenge: str
    product_id: int
    serial_number: str | None
    remote_addr: str | None
    app_version: str | None
    board_type: str | None
    created_at: datetime
    seen_at: datetime
    expires_at: datetime | None  # None once accepted
    accepted_at: datetime | None
    existing_device: bool = False  # pending only: the name is already a device's (listing only)

    @property
    def accepted(self) -> bool:
        return self.expires_at is None


@dataclass(frozen=True)
class Accepted:
    activation: ActivationRecord
    device: DeviceRecord
    created_device: bool  # False: the name was already a device (it keeps its product)


# Devices that never reported a version are shown under this label in the version chart.
UNKNOWN_VERSION = ""


@dataclass(frozen=True)
class ProductCount:
    product_id: int
    devices: int
    online: int


@dataclass(frozen=True)
class VersionCount:
    product_id: int
    version: str  # UNKNOWN_VERSION: never reported
    devices: int


@dataclass(frozen=True)
class DeltaRecord:
    """A delta patch (issue 14): turns the image of package ``base_package_id`` into that of
    ``package_id``. It is downloaded like firmware, so it has the fields a download needs
    (``file_name``, ``original_name``, ``size``, ``sha256``, ``created_at``)."""

    id: int
    package_id: int
    base_package_id: int
    base_version: str
    base_elf_sha256: str | None
    file_name: str
    size: int
    md5: str
    sha256: str
    compression: str
    created_at: datetime
    target_file_name: str  # the package's own file: what an upgrade to it names

    @property
    def original_name(self) -> str:
        return f"delta-{self.base_package_id}-to-{self.package_id}.detools"
