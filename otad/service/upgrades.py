"""Push upgrades: enable, track to the end (reports, timeouts, cancel), and restore after a restart."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from otad.errors import Conflict, InvalidInput, NotFound
from otad.service.clock import utc_now
from otad.service.devices import DeviceRegistry
from otad.service.offers import Offers
from otad.service.ports import Publisher
from otad.model import (OPEN_STATES, TERMINAL_STATES, NewUpgrade, PackageRecord, UpgradeEventRecord, UpgradeRecord,
                        UpgradeState)
from otad.service.validation import check_device_name, check_package_name, parse_int

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 500
_MAX_TIMEOUT = 10 * 365 * 24 * 3600
_UPGRADE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class EnabledUpgrade:
    version: str
    device_name: str
    package: PackageRecord


@dataclass(frozen=True)
class Recipient:
    device_id: int
    device_name: str
    stage: int | None = None


@dataclass(frozen=True)
class UpgradeChange:
    """An upgrade moved from ``old`` (None: it was just created) to ``new``."""

    version: str
    device_name: str
    campaign_id: int | None
    old: UpgradeState | None
    new: UpgradeState
    stage: int | None = None


@dataclass(frozen=True)
class TimelinePage:
    items: list[UpgradeEventRecord]
    total: int
    page: int
    page_size: int


@dataclass(frozen=True)
class UpgradePage:
    items: list[UpgradeRecord]
    total: int
    page: int
    page_size: int


class UpgradeService:
    def __init__(self, store, devices: DeviceRegistry, publisher: Publisher, default_timeout: float,
                 clock: Callable[[], datetime] = utc_now, offers: Offers | None = None) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self.offers = offers or Offers()  # what each command says beyond the seed's keys
        self._devices = devices
        self._publisher = publisher
        self._default_timeout = default_timeout
        self.clock = clock
        self._listeners: list[Callable[[list[UpgradeChange]], None]] = []

    # --- starting ---

    async def enable(self, name: object, device_name: object, timeout: object = None) -> EnabledUpgrade:
        """Send package ``name`` of the device's product to the device, superseding earlier upgrades."""
        name = check_package_name(name)
        device = await self._devices.get(device_name)  # validates the name, NotFound if unknown
        package = await self._store.repo.find_package(device.product_id, name)
        if package is None:
            raise NotFound(f"参数无效: product {device.product_id} has no package named '{name}'")
        seconds = self._default_timeout if timeout in (None, "") else parse_int(timeout, "timeout")
        if not 0 < seconds <= _MAX_TIMEOUT:
            raise InvalidInput(f"参数无效: timeout must be from 1 to {_MAX_TIMEOUT} seconds")
        return await self.start(device.id, device.name, package, seconds)

    async def start(self, device_id: int, device_name: str, package: PackageRecord, timeout: float,
                    campaign_id: int | None = None, stage: int | None = None) -> EnabledUpgrade:
        """The one way an upgrade begins, for otaEnable and campaigns alike."""
        return (await self.start_many([Recipient(device_id, device_name, stage)], package, timeout, campaign_id))[0]

    async def start_many(self, recipients: list[Recipient], package: PackageRecord, timeout: float,
                         campaign_id: int | None = None) -> list[EnabledUpgrade]:
        """Start ``package`` on many devices at once: recorded in one transaction, sent, then marked
        notified in one statement (a campaign step is a few writes, not a few per device)."""
        now = self.clock()
        new = [NewUpgrade(version=str(uuid.uuid4()), device_id=r.device_id,
                          timeout_at=now + timedelta(seconds=timeout), stage=r.stage) for r in recipients]
        # Recorded before it is sent: if the process dies in between, the restart sends it.
        superseded = await self._store.rollouts.record_upgrades(new, package=package, state=UpgradeState.CREATED, at=now,
                                                                superseded_state=UpgradeState.SUPERSEDED,
                                                                open_states=OPEN_STATES, campaign_id=campaign_id)
        changes = [UpgradeChange(e.version, e.device_name, e.campaign_id, UpgradeState(e.state), UpgradeState.SUPERSEDED)
                   for e in superseded]
        started = []
        commands = await self.offers.commands(package, [(r.device_name, item.version, item.timeout_at)
                                                        for r, item in zip(recipients, new)])
        for recipient, item, command in zip(recipients, new, commands):
            await self._publisher.send_command(recipient.device_name, command)
            started.append(EnabledUpgrade(version=item.version, device_name=recipient.device_name, package=package))
            changes.append(UpgradeChange(item.version, recipient.device_name, campaign_id, None, UpgradeState.NOTIFIED,
                                         stage=recipient.stage))
        await self._store.rollouts.advance_upgrades([item.version for item in new], UpgradeState.CREATED,
                                                    UpgradeState.NOTIFIED, self.clock())
        await self.changed(changes)
        for upgrade in started if len(started) <= 10 else started[:1]:
            log.info("upgrade %s: package %d '%s' sent to device %s%s", upgrade.version, package.id, package.name,
                     upgrade.device_name, f" (campaign {campaign_id})" if campaign_id else "")
        if len(started) > 10:
            log.info("package %d '%s' sent to %d devices (campaign %s)", package.id, package.name, len(started),
                     campaign_id)
        return started

    async def restore_pending(self) -> int:
        """Keep each device's latest open command again for its next subscribe (after a restart); one
        whose package is gone is cancelled instead. How many were kept."""
        latest = {upgrade.device_name: upgrade for upgrade in await self._store.rollouts.open_upgrades(OPEN_STATES)}
        by_package: dict[int | None, list[UpgradeRecord]] = {}
        for upgrade in latest.values():
            by_package.setdefault(upgrade.package_id, []).append(upgrade)
        # An upgrade from before timeouts has none: its command (and a signed one's expiry) gets the
        # default timeout from now, not a passive reply's lifetime.
        default_timeout = self.clock() + timedelta(seconds=self._default_timeout)
        orphans: list[UpgradeRecord] = []
        for package_id, upgrades in by_package.items():
            package = await self._store.repo.find_package_by_id(package_id) if package_id is not None else None
            if package is None:
                orphans.extend(upgrades)
                continue
            commands = await self.offers.commands(package, [(u.device_name, u.version, u.timeout_at or default_timeout)
                                                            for u in upgrades])
            for upgrade, command in zip(upgrades, commands):
                await self._publisher.keep_command(upgrade.device_name, command)
        gone = {u.version for u in orphans}
        await self._store.rollouts.advance_upgrades([u.version for u in latest.values() if u.state == UpgradeState.CREATED
                                                     and u.version not in gone],
                                                    UpgradeState.CREATED, UpgradeState.NOTIFIED, self.clock())
        await self._cancel_orphans(orphans)
        return len(latest) - len(orphans)

    async def _cancel_orphans(self, orphans: list[UpgradeRecord]) -> None:
        """Open upgrades whose package is gone (deleted while one was being enabled, or by an older
        otad that left them open): their file cannot be fetched, and a command rebuilt from the
        upgrade alone would go out unsigned with signing on. Ended as a package deletion ends them."""
        for upgrade in orphans:
            await self.transition(upgrade, UpgradeState.CANCELLED, "server", "package deleted")
        if orphans:
            log.warning("%d open upgrade(s) whose package is gone cancelled instead of restored (%s)", len(orphans),
                        ", ".join(u.version for u in orphans[:5]) + (", ..." if len(orphans) > 5 else ""))

    # --- moving on ---

    def on_change(self, listener: Callable[[list[UpgradeChange]], None]) -> None:
        """Call ``listener(changes)`` after upgrades change state (the campaign engine's view)."""
        self._listeners.append(listener)

    def changed_elsewhere(self, changes: list[UpgradeChange]) -> None:
        """Another node changed these upgrades: only the listeners hear of it (this node's view of
        a campaign, live screens). Their commands are that node's business: clearing one here could
        clear a newer command on a shared broker."""
        for listener in self._listeners:
            try:
                listener(changes)
            except Exception:
                log.exception("an upgrade-change listener failed")

    async def changed(self, changes: list[UpgradeChange]) -> None:
        """Upgrades changed state (already written): an upgrade that ended takes its command with
        it, never delivered again, retained or queued; then the listeners hear of it."""
        # One line per ended upgrade while few end at once; a burst is summed up in one line (a
        # campaign's last reports are thousands of ends in a second).
        ended: Counter = Counter()
        for index, change in enumerate(changes):
            if index and index % 200 == 0:
                await asyncio.sleep(0)  # thousands of commands withdrawn must not hold the loop
            if change.new in TERMINAL_STATES and change.new != UpgradeState.SUPERSEDED:
                await self._publisher.clear_command(change.device_name)
                ended[change.new] += 1
                if len(changes) <= 10:
                    log.info("upgrade %s of %s: %s -> %s", change.version, change.device_name, change.old,
                             change.new)
            else:
                log.debug("upgrade %s of %s: %s -> %s", change.version, change.device_name, change.old, change.new)
        if len(changes) > 10 and ended:
            log.info("%s upgrades ended", ", ".join(f"{n} {state}" for state, n in sorted(ended.items())))
        for listener in self._listeners:
            try:
                listener(changes)
            except Exception:
                log.exception("an upgrade-change listener failed")

    async def transition(self, upgrade: UpgradeRecord, to_state: UpgradeState, source: str,
                         detail: str | None = None, progress: int | None = None,
                         message: str | None = None) -> bool:
        """Move ``upgrade`` to ``to_state`` (if nothing moved it meanwhile)."""
        finished = to_state in TERMINAL_STATES
        moved = await self._store.rollouts.advance_upgrade(upgrade.version, upgrade.state, to_state, self.clock(),
                                                           source, detail, progress=progress, message=message,
                                                           finished=finished)
        if moved:
            await self.changed([UpgradeChange(upgrade.version, upgrade.device_name, upgrade.campaign_id,
                                              UpgradeState(upgrade.state), to_state)])
        return moved

    async def end_open(self, *, state: UpgradeState, detail: str, package_id: int | None = None,
                       campaign_id: int | None = None) -> int:
        """End every open upgrade of a package or a campaign (its commands withdrawn)."""
        ended = await self._store.rollouts.end_open_upgrades(open_states=OPEN_STATES, state=state, at=self.clock(),
                                                             detail=detail, package_id=package_id,
                                                             campaign_id=campaign_id)
        await self.changed([UpgradeChange(e.version, e.device_name, e.campaign_id, UpgradeState(e.state), state)
                            for e in ended])
        return len(ended)

    async def cancel(self, version: str) -> UpgradeRecord:
        # A report may move the upgrade between reading and writing it: read again and retry.
        for _ in range(5):
            upgrade = await self.get(version)
            if upgrade.state in TERMINAL_STATES:
                raise Conflict(f"参数无效: upgrade {version} has already ended ({upgrade.state})")
            if await self.transition(upgrade, UpgradeState.CANCELLED, "admin"):
                return await self.get(version)
        raise Conflict(f"参数无效: upgrade {version} keeps changing; try again")

    async def expire_due(self) -> int:
        """Time out every open upgrade past its deadline; the timeout sweeper calls this."""
        expired = 0
        for upgrade in await self._store.rollouts.due_upgrades(self.clock(), OPEN_STATES):
            if await self.transition(upgrade, UpgradeState.TIMED_OUT, "timeout", "not finished in time"):
                expired += 1
        return expired

    # --- looking ---

    async def get(self, version: object) -> UpgradeRecord:
        if not isinstance(version, str) or not _UPGRADE_ID.fullmatch(version):
            raise NotFound(f"参数无效: no upgrade {str(version)[:64]!r}")
        upgrade = await self._store.rollouts.find_upgrade(version)
        if upgrade is None:
            raise NotFound(f"参数无效: no upgrade {version}")
        return upgrade

    async def timeline(self, upgrade: UpgradeRecord, page: object = None, page_size: object = None) -> TimelinePage:
        """One page of an upgrade's timeline, oldest first (``MAX_PAGE_SIZE`` entries at most)."""
        number = 1 if page in (None, "") else min(max(parse_int(page, "timelinePage"), 1), 1_000_000)
        size = 100 if page_size in (None, "") else min(max(parse_int(page_size, "timelinePageSize"), 1), MAX_PAGE_SIZE)
        items, total = await self._store.rollouts.upgrade_events(upgrade.id, (number - 1) * size, size)
        return TimelinePage(items=items, total=total, page=number, page_size=size)

    async def list(self, *, device_name: object = None, state: object = None, campaign: object = None,
                   page: object = None, page_size: object = None) -> UpgradePage:
        device = check_device_name(device_name) if device_name not in (None, "") else None
        if state not in (None, "") and state not in set(UpgradeState):
            raise InvalidInput(f"参数无效: state must be one of {', '.join(UpgradeState)}")
        page_number = 1 if page in (None, "") else min(max(parse_int(page, "page"), 1), 1_000_000)
        size = 50 if page_size in (None, "") else min(max(parse_int(page_size, "pageSize"), 1), MAX_PAGE_SIZE)
        campaign_id = None if campaign in (None, "") else parse_int(campaign, "campaign")
        items, total = await self._store.rollouts.list_upgrades(device_name=device, state=state or None,
                                                                campaign_id=campaign_id,
                                                                offset=(page_number - 1) * size, limit=size)
        return UpgradePage(items=items, total=total, page=page_number, page_size=size)

    async def counts_by_state(self, campaign_id: int | None = None) -> dict[str, int]:
        return await self._store.rollouts.count_upgrades_by_state(campaign_id)

    async def open_upgrade_of(self, device_name: str) -> UpgradeRecord | None:
        return await self._store.rollouts.open_upgrade_of(device_name, OPEN_STATES)
