"""A running campaign as the engine sees it, kept up to date by changes instead of re-read.

Loaded from the database once (at the campaign's first step in this process), then moved by the
upgrade changes the service announces and by the devices that join the product. A step then costs
what changed since the last one, not the size of the fleet.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable

from otad.model import UpgradeState


class CampaignView:
    def __init__(self, product_id: int, name: str, stages: list[int]) -> None:
        self.product_id = product_id
        self.name = name
        self.stages = stages
        self.last_device_id = 0  # devices of the product up to this id are known
        self.loaded_at = 0.0  # time.monotonic() of the last load or check against the database
        self.stage_of: dict[str, int] = {}  # device -> its stage (devices past the last stage are absent)
        self.device_ids: dict[str, int] = {}
        self.devices_per_stage: Counter = Counter()
        self.upgrade_of: dict[str, tuple[str, UpgradeState]] = {}  # device -> (version, state)
        self.states_per_stage: dict[int, Counter] = {}
        self._unstarted: dict[int, list[str]] = {}  # stage -> devices without an upgrade, sorted
        self._scan_from: dict[int, int] = {}  # stage -> index before which every device has one

    # --- filling and moving ---

    def add_device(self, device_id: int, name: str, stage: int | None) -> None:
        self.last_device_id = max(self.last_device_id, device_id)
        if stage is None or name in self.stage_of:
            return
        self.stage_of[name] = stage
        self.device_ids[name] = device_id
        self.devices_per_stage[stage] += 1
        if name not in self.upgrade_of:
            waiting = self._unstarted.setdefault(stage, [])
            index = bisect.bisect_left(waiting, name)
            waiting.insert(index, name)
            if index < self._scan_from.get(stage, 0):
                self._scan_from[stage] = index

    def remove_device(self, name: str) -> None:
        stage = self.stage_of.pop(name, None)
        self.device_ids.pop(name, None)
        if stage is None:
            return
        self.devices_per_stage[stage] -= 1
        upgrade = self.upgrade_of.pop(name, None)
        if upgrade is not None:
            self.states_per_stage[stage][upgrade[1]] -= 1

    def set_upgrade(self, name: str, version: str, old: UpgradeState | None, new: UpgradeState) -> None:
        """An upgrade of this campaign moved; ``old`` None: it was just created. A change that
        does not start from what the view holds is stale (the view was loaded after it)."""
        stage = self.stage_of.get(name)
        if stage is None:
            return
        current = self.upgrade_of.get(name)
        counts = self.states_per_stage.setdefault(stage, Counter())
        if current is None:
            if old is not None and old != UpgradeState.CREATED:
                return  # the view never saw this upgrade start: it was loaded with a newer state
        elif current[0] != version or old is None or current[1] != old:
            return  # another upgrade, a creation notice for one already seen, or stale
        else:
            counts[current[1]] -= 1
        self.upgrade_of[name] = (version, new)
        counts[new] += 1

    # --- reading ---

    def opened(self, stage: int) -> int:
        return sum(self.devices_per_stage[s] for s in range(stage + 1))

    def states_up_to(self, stage: int) -> Counter:
        total: Counter = Counter()
        for s in range(stage + 1):
            total.update(self.states_per_stage.get(s, Counter()))
        return +total

    def unstarted(self, stage: int) -> Iterable[tuple[int, str]]:
        """Devices of stages up to ``stage`` without an upgrade, in (stage, name) order."""
        for s in range(stage + 1):
            waiting = self._unstarted.get(s, [])
            index = self._scan_from.get(s, 0)
            # Devices before the first one still waiting have started: skip them for good.
            while index < len(waiting) and waiting[index] in self.upgrade_of:
                index += 1
            self._scan_from[s] = index
            for name in waiting[index:]:
                if name not in self.upgrade_of and name in self.stage_of:
                    yield s, name
