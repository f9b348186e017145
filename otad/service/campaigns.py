"""Staged rollouts: a package to a product's devices, canaries first, pausing itself on failures.

A device's stage is a hash of (product, package name, device name): a rerun of the same rollout
picks the same canaries, and a device that joins the product later falls into a stage at once.
The engine (``tick``) is stateless between calls apart from the database, so a restart, even after
``kill -9``, carries on where the rollout stood: upgrades already recorded are not sent twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from otad.errors import Conflict, InvalidInput, NotFound
from otad.service.campaign_view import CampaignView
from otad.service.devices import DeviceRegistry
from otad.model import LIVE_CAMPAIGN_STATES, OPEN_STATES, CampaignRecord, CampaignState, UpgradeState
from otad.service.upgrades import Recipient, UpgradeChange, UpgradeService
from otad.service.validation import check_package_name, parse_int

log = logging.getLogger(__name__)


FAILED = (UpgradeState.FAILED, UpgradeState.TIMED_OUT)
# Ended without an outcome for the device (an admin cancelled it, or a newer upgrade replaced it).
SKIPPED = (UpgradeState.CANCELLED, UpgradeState.SUPERSEDED)
# States in which a device is installing: another upgrade does not interrupt it.
_BUSY_STATES = tuple(state for state in OPEN_STATES if state not in (UpgradeState.CREATED, UpgradeState.NOTIFIED))
# Upgrades started per campaign step (a step is one transaction): the API keeps answering meanwhile.
_MAX_STARTS_PER_STEP = 500
# Seconds between checks of a campaign's view against the database's counts (one aggregate query).
_RESYNC_EVERY = 60.0


def stage_of(product_id: int, name: str, device_name: str, stages: list[int]) -> int | None:
    """The index of the device's stage, or None if the last stage stops short of 100%."""
    digest = hashlib.sha256(f"{product_id}\0{name}\0{device_name}".encode()).digest()
    percent = int.from_bytes(digest[:8], "big") / 2**64 * 100
    for index, limit in enumerate(stages):
        if percent < limit:
            return index
    return None


@dataclass
class CampaignStatus:
    campaign: CampaignRecord
    by_state: Counter = field(default_factory=Counter)
    by_stage: dict[int, Counter] = field(default_factory=dict)
    devices_per_stage: Counter = field(default_factory=Counter)


def _number(raw: object, field_name: str, default: float, low: float, high: float) -> float:
    """A finite number in [low, high] (JSON as Python parses it also has NaN and Infinity)."""
    if raw is None:
        return default
    if (isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw)
            or not low <= raw <= high):
        raise InvalidInput(f"参数无效: {field_name} must be a number from {low:g} to {high:g}")
    return float(raw)


_TEN_YEARS = 10 * 365 * 24 * 3600.0


class Campaigns:
    def __init__(self, store, upgrades: UpgradeService, devices: DeviceRegistry, default_timeout: float) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._upgrades = upgrades
        self._default_timeout = default_timeout
        self._tokens: dict[int, tuple[float, float]] = {}  # campaign id -> (tokens, at) for notifyRate
        self._views: dict[int, CampaignView] = {}  # running campaigns as the engine last saw them
        self._loading: dict[int, list[UpgradeChange | str]] = {}  # campaign -> changes held during a load
        # campaign id -> ((devices, highest device id) of its product when counted, devices per stage)
        self._stage_counts: dict[int, tuple[tuple[int, int], Counter]] = {}
        self._listeners: list[Callable[[int], None]] = []
        upgrades.on_change(self._on_upgrades_changed)
        devices.on_delete(self._on_device_deleted)
        # One campaign step, pause, resume or cancel at a time: a cancel must not land in the middle
        # of a step that is still sending commands.
        self._lock = asyncio.Lock()

    async def create(self, body: object) -> CampaignRecord:
        async with self._lock:  # the check for a live campaign of the same package, and the insert
            return await self._create(body)

    async def _create(self, body: object) -> CampaignRecord:
        if not isinstance(body, dict):
            raise InvalidInput('参数无效: expected {"name", "productId", "stages", ...}')
        name = check_package_name(body.get("name"))
        product_id = parse_int(body.get("productId"), "productId")
        stages = body.get("stages", [1, 10, 50, 100])
        if (not isinstance(stages, list) or not stages or any(isinstance(s, bool) or not isinstance(s, int)
                                                              for s in stages)
                or any(not 0 < s <= 100 for s in stages) or stages != sorted(set(stages))):
            raise InvalidInput("参数无效: stages must be rising cumulative percentages such as [1, 10, 50, 100]")
        success = _number(body.get("successThreshold"), "successThreshold", 0.95, 0, 1)
        failure = _number(body.get("failureThreshold"), "failureThreshold", 0.05, 0, 1)
        max_concurrent = parse_int(body.get("maxConcurrent", 100), "maxConcurrent")
        if not 1 <= max_concurrent <= 100_000:
            raise InvalidInput("参数无效: maxConcurrent must be from 1 to 100000")
        rate = _number(body.get("notifyRate"), "notifyRate", 10, 0.001, 100_000)
        timeout = _number(body.get("timeout"), "timeout", self._default_timeout, 1, _TEN_YEARS)
        package = await self._store.repo.find_package(product_id, name)
        if package is None:
            raise NotFound(f"参数无效: product {product_id} has no package named '{name}'")
        # Two live campaigns of one package would supersede each other's upgrades device by device.
        for live in await self._store.rollouts.list_campaigns(LIVE_CAMPAIGN_STATES):
            if live.product_id == product_id and live.package_id == package.id:
                raise Conflict(f"参数无效: campaign {live.id} already rolls out '{name}' to product {product_id} "
                               f"({live.state}); cancel it first")
        campaign = await self._store.rollouts.insert_campaign(
            name=name, product_id=product_id, package_id=package.id, stages=stages, success_threshold=success,
            failure_threshold=failure, max_concurrent=max_concurrent, notify_rate=rate,
            timeout=timeout, state=CampaignState.RUNNING, current_stage=0)
        log.info("campaign %d: '%s' to product %d in stages %s", campaign.id, name, product_id, stages)
        return campaign

    def on_change(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(campaign_id)`` after a campaign changed state or stage (an admin's pause,
        resume or cancel, or the engine pausing, finishing or opening the next stage)."""
        self._listeners.append(listener)

    def _changed(self, campaign_id: int) -> None:
        for listener in self._listeners:
            try:
                listener(campaign_id)
            except Exception:  # a screen's bookkeeping must not fail the rollout
                log.exception("campaign %d: a change listener failed", campaign_id)

    async def _update(self, campaign_id: int, from_states: tuple | list, **changes) -> bool:
        """``self._store.rollouts.update_campaign``, and the listeners told when it changed the row."""
        if not await self._store.rollouts.update_campaign(campaign_id, from_states, **changes):
            return False
        self._changed(campaign_id)
        return True

    async def get(self, raw_id: object) -> CampaignRecord:
        campaign = await self._store.rollouts.find_campaign(parse_int(raw_id, "id"))
        if campaign is None:
            raise NotFound(f"参数无效: no campaign {raw_id}")
        return campaign

    async def list(self) -> list[CampaignRecord]:
        return await self._store.rollouts.list_campaigns()

    async def pause(self, raw_id: object) -> CampaignRecord:
        async with self._lock:
            return await self._move(raw_id, (CampaignState.RUNNING,), CampaignState.PAUSED, "paused by an admin")

    async def resume(self, raw_id: object) -> CampaignRecord:
        """Run again. Failures so far are accepted by the admin who resumes: only new ones count
        against the threshold, or a campaign that paused itself would pause again at once."""
        async with self._lock:
            campaign = await self.get(raw_id)
            failures = sum(count for _, state, count in await self._store.rollouts.count_campaign_upgrades(campaign.id)
                           if state in FAILED)
            if not await self._update(campaign.id, (CampaignState.PAUSED,), state=CampaignState.RUNNING,
                                      reason=None, failures_accepted=failures):
                raise Conflict(f"参数无效: campaign {campaign.id} is {campaign.state}")
            return await self.get(campaign.id)

    async def cancel(self, raw_id: object) -> CampaignRecord:
        async with self._lock:
            campaign = await self._move(raw_id, (CampaignState.RUNNING, CampaignState.PAUSED),
                                        CampaignState.CANCELLED, "cancelled by an admin")
            # One statement for all, whatever state each upgrade has reached by now.
            await self._upgrades.end_open(state=UpgradeState.CANCELLED, detail="campaign cancelled",
                                          campaign_id=campaign.id)
            return campaign

    async def _move(self, raw_id: object, from_states: tuple, to_state: CampaignState,
                    reason: str | None) -> CampaignRecord:
        campaign = await self.get(raw_id)
        if not await self._update(campaign.id, from_states, state=to_state, reason=reason):
            raise Conflict(f"参数无效: campaign {campaign.id} is {campaign.state}")
        return await self.get(campaign.id)

    async def status(self, raw_id: object) -> CampaignStatus:
        campaign = await self.get(raw_id)
        return await self._status(campaign)

    async def _status(self, campaign: CampaignRecord) -> CampaignStatus:
        status = CampaignStatus(campaign, devices_per_stage=await self._devices_per_stage(campaign))
        for stage, state, count in await self._store.rollouts.count_campaign_upgrades(campaign.id):
            status.by_state[state] += count
            status.by_stage.setdefault(stage, Counter())[state] += count
        return status

    async def _devices_per_stage(self, campaign: CampaignRecord) -> Counter:
        """The product's devices per stage, counted again only when devices joined or left since
        (status is read by every screen once a second; hashing 10,000 names each time is not free)."""
        census = await self._store.product_devices.census(campaign.product_id)
        cached = self._stage_counts.get(campaign.id)
        if cached is not None and cached[0] == census:
            return Counter(cached[1])
        per_stage: Counter = Counter()
        last_id = 0
        rows = await self._store.repo.devices_of_product(campaign.product_id)
        for device_id, device_name in rows:
            last_id = max(last_id, device_id)
            stage = stage_of(campaign.product_id, campaign.name, device_name, campaign.stages)
            if stage is not None:
                per_stage[stage] += 1
        # Keyed by what was counted, not by the census: a device added in between is counted next time.
        self._stage_counts[campaign.id] = ((len(rows), last_id), per_stage)
        return Counter(per_stage)

    # --- the engine ---

    async def tick(self) -> None:
        """Advance every running campaign one step; called every half second by the daemon."""
        running = await self._store.rollouts.list_campaigns([CampaignState.RUNNING])
        for listed in running:
            async with self._lock:
                campaign = await self._store.rollouts.find_campaign(listed.id)  # as it is now, under the lock
                if campaign is None or campaign.state != CampaignState.RUNNING:
                    continue
                try:
                    await self._advance(campaign)
                except Exception:
                    log.exception("campaign %d: step failed; retrying next tick", campaign.id)
        # Paused or ended: its view is dropped, and read afresh if it runs again.
        for campaign_id in set(self._views) - {campaign.id for campaign in running}:
            self._views.pop(campaign_id, None)

    def forget_views(self) -> None:
        """Drop the engine's views of running campaigns (read afresh at the next step): this node
        has just become the leader, or may have missed another node's changes."""
        self._views.clear()

    def _on_upgrades_changed(self, changes: list[UpgradeChange]) -> None:
        for change in changes:
            if change.campaign_id is None:
                continue
            if (waiting := self._loading.get(change.campaign_id)) is not None:
                waiting.append(change)
            elif (view := self._views.get(change.campaign_id)) is not None:
                view.set_upgrade(change.device_name, change.version, change.old, change.new)

    def _on_device_deleted(self, name: str) -> None:
        for view in self._views.values():
            view.remove_device(name)
        for waiting in self._loading.values():
            waiting.append(name)

    async def _view(self, campaign: CampaignRecord) -> CampaignView:
        """The campaign's view: loaded once (and again now and then, to be sure), then only the
        devices that joined since."""
        view = self._views.get(campaign.id)
        if view is not None and time.monotonic() - view.loaded_at > _RESYNC_EVERY:
            if await self._diverged(campaign.id, view):
                log.warning("campaign %d: its view differed from the database; read again", campaign.id)
                view = None
            else:
                view.loaded_at = time.monotonic()
        if view is None:
            view = await self._load(campaign)
        for device_id, name in await self._store.repo.devices_of_product(campaign.product_id, after_id=view.last_device_id):
            view.add_device(device_id, name, stage_of(campaign.product_id, campaign.name, name, campaign.stages))
        return view

    async def _load(self, campaign: CampaignRecord) -> CampaignView:
        """Devices, then upgrades, from the database; what changes meanwhile is held and replayed
        after (a change the snapshot already shows is recognised as stale)."""
        self._views.pop(campaign.id, None)
        held = self._loading[campaign.id] = []
        try:
            view = CampaignView(campaign.product_id, campaign.name, campaign.stages)
            for device_id, name in await self._store.repo.devices_of_product(campaign.product_id):
                view.add_device(device_id, name, stage_of(campaign.product_id, campaign.name, name, campaign.stages))
            latest = {upgrade.device_name: upgrade
                      for upgrade in await self._store.rollouts.campaign_upgrade_states(campaign.id)}
            for upgrade in latest.values():
                view.set_upgrade(upgrade.device_name, upgrade.version, None, UpgradeState(upgrade.state))
        finally:
            self._loading.pop(campaign.id, None)
        for item in held:
            if isinstance(item, str):
                view.remove_device(item)
            else:
                view.set_upgrade(item.device_name, item.version, item.old, item.new)
        view.loaded_at = time.monotonic()
        self._views[campaign.id] = view
        return view

    async def _diverged(self, campaign_id: int, view: CampaignView) -> bool:
        """Whether the database's counts per stage and state differ from the view's."""
        counted = {(stage, state): n for stage, state, n in await self._store.rollouts.count_campaign_upgrades(campaign_id)}
        held = {(stage, state): n for stage, states in view.states_per_stage.items()
                for state, n in states.items() if n}
        return counted != held

    async def _advance(self, campaign: CampaignRecord) -> None:
        view = await self._view(campaign)
        stage = campaign.current_stage
        opened = view.opened(stage)
        states = view.states_up_to(stage)
        failed = max(0, sum(states[s] for s in FAILED) - campaign.failures_accepted)
        ended = failed + states[UpgradeState.UPDATED]
        if opened and failed / opened > campaign.failure_threshold:
            reason = (f"paused itself: {failed} of {opened} devices in stages 1-{stage + 1} failed "
                      f"(over {campaign.failure_threshold:.0%})")
            await self._update(campaign.id, [CampaignState.RUNNING], state=CampaignState.PAUSED, reason=reason)
            log.warning("campaign %d %s", campaign.id, reason)
            return
        in_flight = sum(states[s] for s in OPEN_STATES)
        unstarted = opened - sum(states.values())
        if unstarted <= 0 and in_flight == 0:
            success = states[UpgradeState.UPDATED] / ended if ended else 1.0
            if success < campaign.success_threshold:
                reason = f"paused itself: stage {stage + 1} succeeded on {success:.0%}, below the threshold"
                await self._update(campaign.id, [CampaignState.RUNNING], state=CampaignState.PAUSED, reason=reason)
                return
            if stage + 1 >= len(campaign.stages):
                await self._update(campaign.id, [CampaignState.RUNNING], state=CampaignState.FINISHED)
                log.info("campaign %d finished", campaign.id)
                return
            await self._update(campaign.id, [CampaignState.RUNNING], current_stage=stage + 1)
            log.info("campaign %d: stage %d opened", campaign.id, stage + 2)
            return
        budget = min(campaign.max_concurrent - in_flight, _MAX_STARTS_PER_STEP,
                     self._take_tokens(campaign, unstarted))
        if budget <= 0:
            return
        package = await self._store.repo.find_package_by_id(campaign.package_id) if campaign.package_id else None
        if package is None:
            await self._update(campaign.id, [CampaignState.RUNNING], state=CampaignState.PAUSED,
                               reason="paused itself: its package is gone")
            return
        candidates = list(itertools.islice(view.unstarted(stage), budget * 2))
        # A device in the middle of installing another upgrade (an otaEnable) is left to finish it.
        busy = await self._store.rollouts.devices_busy_elsewhere([name for _, name in candidates], campaign.id,
                                                               _BUSY_STATES)
        chosen = [Recipient(view.device_ids[name], name, s) for s, name in candidates if name not in busy][:budget]
        if chosen:
            await self._upgrades.start_many(chosen, package, campaign.timeout, campaign.id)
        # Tokens not spent on busy devices are given back.
        if len(chosen) < budget:
            tokens, at = self._tokens[campaign.id]
            self._tokens[campaign.id] = (tokens + budget - len(chosen), at)

    def _take_tokens(self, campaign: CampaignRecord, wanted: int) -> int:
        """notifyRate as a token bucket holding one second's worth, and at least one token (a rate
        below one per second must still send)."""
        now = time.monotonic()
        capacity = max(1.0, campaign.notify_rate)
        tokens, at = self._tokens.get(campaign.id, (capacity, now))
        tokens = min(capacity, tokens + (now - at) * campaign.notify_rate)
        taken = min(int(tokens), wanted)
        self._tokens[campaign.id] = (tokens - taken, now)
        return taken
