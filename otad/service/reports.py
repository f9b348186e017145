"""What devices tell us about their upgrades: progress reports, and downloads as evidence.

Reports are applied in batches (``apply_batch``): one read of every upgrade the batch names, the
state machine run over the batch in arrival order, then one transaction with every write. The
rules are those of one report at a time: a state moves forward only, a finished upgrade stays
finished, a duplicate or late report is kept in the timeline. Consecutive reports of the same
status fold into one timeline entry, and entries that changed nothing are capped per upgrade, so a
chatty device cannot grow the database without bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from otad.service.logs import RateLimitedLog
from otad.model import (MAX_VERSION_TEXT, REPORTED_STATES, TERMINAL_STATES, FoldedEvent, NewEvent, ReportTarget,
                        ReportWrites, UpgradeState, UpgradeWrite, next_state)
from otad.service.upgrades import UpgradeChange, UpgradeService
from otad.service.validation import is_clean_text

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024
_ENDED_WITHOUT_OUTCOME = (UpgradeState.CANCELLED, UpgradeState.TIMED_OUT, UpgradeState.SUPERSEDED)
_RACE_RETRIES = 5
_PER_TURN = 200  # reports parsed or planned per event-loop turn


@dataclass(frozen=True)
class ReportReply:
    version: str | None
    accepted: bool
    error: str

    def to_json(self) -> bytes:
        body = {"version": self.version, "accepted": self.accepted, "errorMsg": self.error}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Report:
    """A report that passed validation."""

    device_name: str
    version: str
    status: UpgradeState
    progress: int | None
    message: str | None
    current_version: str | None
    detail: str  # the fields we know, as JSON, for the timeline


class Refused(Exception):
    def __init__(self, version: str | None, why: str) -> None:
        super().__init__(why)
        self.version = version
        self.why = why


def parse_report(device_name: str, payload: bytes) -> Report:
    """Validate one report from ``/oc/devices/{device}/sys/ota/report``; ``Refused`` says why not."""
    try:
        report = json.loads(payload)
    except (ValueError, RecursionError):
        raise Refused(None, "payload is not JSON") from None
    if not isinstance(report, dict):
        raise Refused(None, "payload is not a JSON object")
    version = report.get("version")
    if not isinstance(version, str) or not version:
        raise Refused(None, "version (the upgrade's id from the command) is required")
    if len(version) > 36:
        raise Refused(None, "no such upgrade for this device")
    status = report.get("status")
    if status not in REPORTED_STATES:
        raise Refused(version, f"status must be one of {', '.join(REPORTED_STATES)}")
    progress = report.get("progress")
    if progress is not None and (not isinstance(progress, int) or isinstance(progress, bool)
                                 or not 0 <= progress <= 100):
        raise Refused(version, "progress must be an integer from 0 to 100")
    message = report.get("message")
    current = report.get("currentVersion")
    for field, value, limit in (("message", message, MAX_MESSAGE), ("currentVersion", current, MAX_VERSION_TEXT)):
        if value is None:
            continue
        if not isinstance(value, str) or not is_clean_text(value):
            raise Refused(version, f"{field} must be printable text")
        if len(value) > limit:
            raise Refused(version, f"{field} must be at most {limit} characters")
    # Only the fields we know go in the timeline: a report is not a way to fill the disk.
    known = {key: report[key] for key in ("status", "progress", "message", "currentVersion") if key in report}
    return Report(device_name=device_name, version=version, status=UpgradeState(status), progress=progress,
                  message=message, current_version=current or None,
                  detail=json.dumps(known, ensure_ascii=False, separators=(",", ":")))


class _Working:
    """One upgrade while a batch is planned: where it stands after the reports so far."""

    def __init__(self, target: ReportTarget) -> None:
        self.target = target
        self.state = UpgradeState(target.state)
        self.progress: int | None = None
        self.message: str | None = None
        self.finished_at: datetime | None = None
        self.touched = False
        self.notes = target.notes
        self.last_state = target.last_event_state
        self.last_source = target.last_event_source
        self.last_db_event = target.last_event_id  # the entry a repeat folds into, if not a new one
        self.last_new: NewEvent | None = None


class Reports:
    def __init__(self, store, upgrades: UpgradeService, timeline_limit: int = 100) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._upgrades = upgrades
        self._timeline_limit = max(1, timeline_limit)
        self._refusals = RateLimitedLog(log, "OTA reports refused")
        self._version_listeners: list[Callable[[str, str], object]] = []

    def on_version(self, listener: Callable[[str, str], object]) -> None:
        """Call ``listener(device_name, version)`` after a report's ``currentVersion`` was written."""
        self._version_listeners.append(listener)

    async def apply(self, device_name: str, payload: bytes) -> ReportReply:
        """Apply one report (a batch of one)."""
        return (await self.apply_batch([(device_name, payload)]))[0]

    async def apply_batch(self, items: list[tuple[str, bytes]]) -> list[ReportReply]:
        """Apply reports in arrival order, all in one transaction, and return each one's reply.
        Never raises for bad input. Raises ``StorageUnavailable`` when the batch could not be
        written (nothing of it was): the caller retries, the devices have no PUBACK yet."""
        parsed: list[Report | ReportReply] = []
        for index, (device_name, payload) in enumerate(items):
            if index and index % _PER_TURN == 0:
                await asyncio.sleep(0)  # a big batch must not hold the event loop in one piece
            try:
                parsed.append(parse_report(device_name, payload))
            except Refused as refused:
                parsed.append(self._refuse(device_name, refused.version, refused.why))
        reports = [report for report in parsed if isinstance(report, Report)]
        for _ in range(_RACE_RETRIES):
            targets = await self._store.report_writes.load_report_targets(report.version for report in reports)
            replies, writes, changes = await self._plan(reports, targets)
            if not writes or await self._store.report_writes.apply_report_writes(writes):
                break
            # Another writer moved one of these upgrades between the read and the write: read again.
        else:
            raise RuntimeError(f"a batch of {len(reports)} reports kept losing races with other writers")
        if writes.firmware:
            self._versions_written(reports, targets)
        try:
            await self._upgrades.changed(changes)
        except Exception:
            # Committed already: a failure to withdraw a command or tell a listener must not make
            # the caller apply the batch again.
            log.exception("after applying %d reports, handling their %d changes failed", len(reports), len(changes))
        answers = iter(replies)
        return [next(answers) if isinstance(item, Report) else item for item in parsed]

    async def _plan(self, reports: list[Report], targets: dict[str, ReportTarget]
                    ) -> tuple[list[ReportReply], ReportWrites, list[UpgradeChange]]:
        """The writes of a batch, from the reports in arrival order. Nothing else plans meanwhile
        (one ingest task); a change made elsewhere in between is caught by the compare-and-set."""
        now = self._upgrades.clock()
        writes = ReportWrites()
        working: dict[int, _Working] = {}
        replies: list[ReportReply] = []
        for index, report in enumerate(reports):
            if index and index % _PER_TURN == 0:
                await asyncio.sleep(0)
            target = targets.get(report.version)
            if target is None or target.device_name != report.device_name:
                replies.append(self._refuse(report.device_name, report.version, "no such upgrade for this device"))
                continue
            upgrade = working.get(target.id) or working.setdefault(target.id, _Working(target))
            if report.current_version:
                writes.firmware[target.device_id] = report.current_version
            replies.append(self._step(upgrade, report, now, writes))
        changes = []
        for upgrade in working.values():
            target = upgrade.target
            if upgrade.touched:
                writes.upgrades.append(UpgradeWrite(
                    id=target.id, from_state=target.state, to_state=upgrade.state, progress=upgrade.progress,
                    message=upgrade.message, finished_at=upgrade.finished_at, updated_at=now))
            if upgrade.state != target.state:
                changes.append(UpgradeChange(version=target.version, device_name=target.device_name,
                                             campaign_id=target.campaign_id, old=UpgradeState(target.state),
                                             new=upgrade.state))
            if upgrade.notes > self._timeline_limit:
                writes.trims.append((target.id, upgrade.notes - self._timeline_limit))
        return replies, writes, changes

    def _versions_written(self, reports: list[Report], targets: dict[str, ReportTarget]) -> None:
        for report in reports:
            target = targets.get(report.version)
            if report.current_version and target is not None and target.device_name == report.device_name:
                for listener in self._version_listeners:
                    listener(report.device_name, report.current_version)

    def _step(self, upgrade: _Working, report: Report, now: datetime, writes: ReportWrites) -> ReportReply:
        """One report against where its upgrade stands in this batch."""
        target = next_state(upgrade.state, report.status)
        if target is not None:
            upgrade.state, upgrade.touched = target, True
            upgrade.progress = report.progress if report.progress is not None else upgrade.progress
            upgrade.message = report.message if report.message is not None else upgrade.message
            if target in TERMINAL_STATES:
                upgrade.finished_at = now
            self._new_event(upgrade, writes, NewEvent(upgrade_id=upgrade.target.id, at=now, state=target,
                                                      source="device", detail=report.detail, changed=True))
            return ReportReply(report.version, True, "")
        if report.status == upgrade.state and upgrade.state not in TERMINAL_STATES:
            # More progress in the state it is in: the upgrade shows the latest.
            if report.progress is not None or report.message is not None:
                upgrade.touched = True
                upgrade.progress = report.progress if report.progress is not None else upgrade.progress
                upgrade.message = report.message if report.message is not None else upgrade.message
        if upgrade.last_state == report.status and upgrade.last_source == "device":
            self._fold(upgrade, writes, report.detail, now)
        else:
            # A late or out-of-order report: kept in the timeline, the state stands.
            upgrade.notes += 1
            self._new_event(upgrade, writes, NewEvent(upgrade_id=upgrade.target.id, at=now, state=report.status,
                                                      source="device", detail=report.detail, changed=False))
        if upgrade.state in _ENDED_WITHOUT_OUTCOME:
            return ReportReply(report.version, False, f"upgrade has ended ({upgrade.state})")
        return ReportReply(report.version, True, "")

    @staticmethod
    def _new_event(upgrade: _Working, writes: ReportWrites, event: NewEvent) -> None:
        writes.new_events.append(event)
        upgrade.last_new, upgrade.last_db_event = event, None
        upgrade.last_state, upgrade.last_source = event.state, event.source

    @staticmethod
    def _fold(upgrade: _Working, writes: ReportWrites, detail: str, now: datetime) -> None:
        if upgrade.last_new is not None:
            upgrade.last_new.count += 1
            upgrade.last_new.last_at, upgrade.last_new.detail = now, detail
            return
        event_id = upgrade.last_db_event
        assert event_id is not None
        added = writes.folded[event_id].added + 1 if event_id in writes.folded else 1
        writes.folded[event_id] = FoldedEvent(event_id, added, now, detail)

    def _refuse(self, device_name: str, version: str | None, why: str) -> ReportReply:
        self._refusals.warning("from %s: %s", device_name, why)
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
