"""What the service needs from the outside world, as protocols the adapters implement."""

from __future__ import annotations

from typing import Protocol


class Publisher(Protocol):
    """Delivers OTA commands to devices. The embedded-broker adapter implements it."""

    async def send_command(self, device_name: str, payload: bytes) -> None:
        """Deliver ``payload`` on the device's OTA topic now if it is connected, and keep it as the
        device's current command (replacing any earlier one) for its next subscribe or reconnect."""

    async def keep_command(self, device_name: str, payload: bytes) -> None:
        """Keep ``payload`` as the device's current command without sending it (used at startup)."""

    async def clear_command(self, device_name: str) -> None:
        """Forget the device's current command, kept or queued."""

    async def forget_device(self, device_name: str) -> None:
        """The device was deleted: clear its command and end its sessions, live or persistent."""
