"""The states of an upgrade (and the one rule for moving between them) and of a campaign."""

from __future__ import annotations

from enum import StrEnum


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
