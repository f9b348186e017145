"""States of an upgrade."""

from __future__ import annotations

from enum import StrEnum


class UpgradeState(StrEnum):
    CREATED = "created"        # recorded, not yet handed to the broker
    NOTIFIED = "notified"      # the command is out: delivered to a live device, or kept for its return
    SUPERSEDED = "superseded"  # a newer enable for the same device replaced it
    CANCELLED = "cancelled"    # its package was deleted


# Upgrades whose command a device should still receive.
OPEN_STATES = (UpgradeState.CREATED, UpgradeState.NOTIFIED)
