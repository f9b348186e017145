"""Which change made on one node drops which in-process cache on the others.

The caches (each filled from the database, so dropping an entry only costs a read):
- ``DeviceRegistry`` login cache (name -> password hash): a device deleted or given a new password;
- ``PassivePins`` poll cache (name -> pin; the HTTP poll replies are keyed by the pin object, so
  they follow): a pin saved or deleted, or its device deleted;
- ``PackageCatalog`` by file name (the download path): a package deleted;
- the campaign engine's views of running campaigns, and the live screens: upgrades that changed
  state on another node (reports land on whichever node the device or the broker chose).
API tokens, users and login tokens are not cached: each request reads them, so a revoke or a
password change on one node holds on every node at once. The login guard's counts stay per node.

A node that missed notifications (its session was down) drops everything: ``forget_everything``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from otad.cluster import RESET, Node
from otad.service import Services
from otad.model import UpgradeState
from otad.service.upgrades import UpgradeChange

log = logging.getLogger(__name__)

DEVICE_DELETED = "device-deleted"
DEVICE_LOGIN = "device-login"  # a new password
PIN = "pin"
PACKAGE_DELETED = "package-deleted"
UPGRADES = "upgrades"
CAMPAIGN = "campaign"
_CHANGES_PER_MESSAGE = 30  # about 150 bytes each: a message stays under NOTIFY's payload limit


def _encode(change: UpgradeChange) -> list[Any]:
    return [change.version, change.device_name, change.campaign_id, change.old, change.new, change.stage]


def _decode(item: list[Any]) -> UpgradeChange:
    version, device_name, campaign_id, old, new, stage = item
    return UpgradeChange(version, device_name, campaign_id, UpgradeState(old) if old is not None else None,
                         UpgradeState(new), stage)


class CacheSync:
    """Sends this node's changes to the others and applies theirs here. ``forget_device`` is called
    for a device deleted elsewhere (the embedded broker ends its sessions here)."""

    def __init__(self, services: Services,
                 forget_device: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._services = services
        self._forget_device = forget_device
        self._node: Node | None = None
        self._replaying = False  # changes heard from another node are not sent back
        self._tasks: set[asyncio.Task] = set()

    def attach(self, node: Node) -> None:
        """Start telling ``node``'s peers of the changes made here."""
        self._node = node
        services = self._services
        services.devices.on_delete(lambda name: self._send(DEVICE_DELETED, name))
        services.devices.on_login_change(lambda name: self._send(DEVICE_LOGIN, name))
        services.passive.on_change(lambda name: self._send(PIN, name))
        services.packages.on_delete(lambda file_name: self._send(PACKAGE_DELETED, file_name))
        services.upgrades.on_change(self._upgrades_changed)
        services.campaigns.on_change(lambda campaign_id: self._send(CAMPAIGN, campaign_id))

    def _send(self, kind: str, key: Any) -> None:
        if self._node is not None and not self._replaying:
            self._node.notify(kind, key)

    def _upgrades_changed(self, changes: list[UpgradeChange]) -> None:
        for start in range(0, len(changes), _CHANGES_PER_MESSAGE):
            self._send(UPGRADES, [_encode(change) for change in changes[start:start + _CHANGES_PER_MESSAGE]])

    def forget_everything(self) -> None:
        """Notifications may have been lost: every cache is read again from the database."""
        services = self._services
        services.devices.forget_logins()
        services.passive.forget()
        services.packages.forget()
        services.campaigns.forget_views()

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run ``work`` (what another node's change or death asks of this one) in a task of ours; its
        failure is logged."""
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("acting on another node's change failed")

        task = asyncio.create_task(run(), name="otad-cluster-work")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait (at most a few seconds) for what ``spawn`` started."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
        for task in self._tasks:
            task.cancel()

    def heard(self, kind: str, key: Any) -> None:
        """Apply another node's change here."""
        services = self._services
        self._replaying = True
        try:
            if kind == DEVICE_DELETED:
                services.devices.deleted_elsewhere(key)
                if self._forget_device is not None:
                    self.spawn(self._forget_device(key))
            elif kind == DEVICE_LOGIN:
                services.devices.forget_logins(key)
            elif kind == PIN:
                services.passive.forget(key)
            elif kind == PACKAGE_DELETED:
                services.packages.forget(key)
                services.passive.forget()  # a cached reply may name a patch deleted with it
            elif kind == UPGRADES:
                services.upgrades.changed_elsewhere([_decode(item) for item in key])
            elif kind == CAMPAIGN:
                services.live.campaign_changed(key)
            elif kind == RESET:
                self.forget_everything()
            else:
                log.warning("ignoring an unknown change %r from another node", kind)
        finally:
            self._replaying = False
