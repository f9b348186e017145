"""What devices tell us about their upgrades: progress reports, and downloads as evidence."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from otad.service.states import REPORTED_STATES, UpgradeState, next_state
from otad.service.upgrades import UpgradeService
from otad.service.validation import is_clean_text
from otad.store import repo, rollouts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportReply:
    version: str | None
    accepted: bool
    error: str

    def to_json(self) -> bytes:
        body = {"version": self.version, "accepted": self.accepted, "errorMsg": self.error}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class Reports:
    def __init__(self, upgrades: UpgradeService) -> None:
        self._upgrades = upgrades

    async def apply(self, device_name: str, payload: bytes) -> ReportReply:
        """Apply one report from ``/oc/devices/{device}/sys/ota/report``. Never raises for bad
        input: the device gets a reply saying what was wrong, and the log a line."""
        try:
            report = json.loads(payload)
        except (ValueError, RecursionError):
            return self._refuse(device_name, None, "payload is not JSON")
        if not isinstance(report, dict):
            return self._refuse(device_name, None, "payload is not a JSON object")
        version = report.get("version")
        if not isinstance(version, str) or not version:
            return self._refuse(device_name, None, "version (the upgrade's id from the command) is required")
        if len(version) > 36:
            return self._refuse(device_name, None, "no such upgrade for this device")
        status = report.get("status")
        if status not in REPORTED_STATES:
            return self._refuse(device_name, version, f"status must be one of {', '.join(REPORTED_STATES)}")
        progress = report.get("progress")
        if progress is not None and (not isinstance(progress, int) or isinstance(progress, bool)
                                     or not 0 <= progress <= 100):
            return self._refuse(device_name, version, "progress must be an integer from 0 to 100")
        message = report.get("message")
        current = report.get("currentVersion")
        for field, value in (("message", message), ("currentVersion", current)):
            if value is not None and (not isinstance(value, str) or len(value) > 1024 or not is_clean_text(value)):
                return self._refuse(device_name, version, f"{field} must be printable text")

        upgrade = await rollouts.find_upgrade(version)
        if upgrade is None or upgrade.device_name != device_name:
            return self._refuse(device_name, version, "no such upgrade for this device")
        if isinstance(current, str) and current:
            device = await repo.find_device(device_name)
            if device is not None:
                await repo.set_firmware_version(device.id, current)
        # Only the fields we know go in the timeline: a report is not a way to fill the disk.
        known = {key: report[key] for key in ("status", "progress", "message", "currentVersion") if key in report}
        detail = json.dumps(known, ensure_ascii=False, separators=(",", ":"))
        target = next_state(UpgradeState(upgrade.state), UpgradeState(status))
        if target is None or not await self._upgrades.transition(upgrade, target, "device", detail,
                                                                  progress=progress, message=message):
            # A duplicate, late or out-of-order report: kept in the timeline, the state stands.
            await rollouts.note_upgrade_event(version, self._upgrades.clock(), status, "device", detail)
            if upgrade.state in (UpgradeState.CANCELLED, UpgradeState.TIMED_OUT, UpgradeState.SUPERSEDED):
                return ReportReply(version, False, f"upgrade has ended ({upgrade.state})")
        return ReportReply(version, True, "")

    @staticmethod
    def _refuse(device_name: str, version: str | None, why: str) -> ReportReply:
        log.warning("OTA report from %s refused: %s", device_name, why)
        return ReportReply(version, False, why)

    async def note_download(self, file_name: str, device_name: object) -> None:
        """A device fetched its upgrade's file: it is downloading, whether or not it said so."""
        if not isinstance(device_name, str) or not device_name:
            return
        upgrade = await self._upgrades.open_upgrade_of(device_name)
        if upgrade is not None and upgrade.file_name == file_name and upgrade.state in (
                UpgradeState.CREATED, UpgradeState.NOTIFIED):
            await self._upgrades.transition(upgrade, UpgradeState.DOWNLOADING, "download",
                                            "the device fetched the file")
