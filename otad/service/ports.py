"""What the service needs from the outside world, as protocols the adapters implement."""

from __future__ import annotations

from typing import Protocol

from otad.errors import OtadError


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


class ProvisioningFailed(OtadError):
    """The broker that devices log in to did not take a device's account change (HTTP 502).
    Nothing changed in otad's registry; the same request may succeed once the broker answers."""

    code = 999
    status = 502
    default_message = "失败: the MQTT broker did not provision the device"


class DeviceCredentials(Protocol):
    """Puts device accounts where devices log in when that is not otad itself (an external broker
    with mqtt.provisioning = mosquitto-dynsec). Raises ProvisioningFailed."""

    async def provision(self, devices: list[tuple[str, str]]) -> None:
        """Create each (name, password) account, or give an existing one the new password."""

    async def revoke(self, name: str) -> None:
        """Remove the device's account (and so its sessions); an account already gone is fine."""

    async def close(self) -> None:
        """Release the connection to the broker, if one is open."""


class NoProvisioning:
    """The embedded broker checks device passwords itself (and mqtt.provisioning = none leaves
    accounts to the operator): nothing to push anywhere."""

    async def provision(self, devices: list[tuple[str, str]]) -> None:
        pass

    async def revoke(self, name: str) -> None:
        pass

    async def close(self) -> None:
        pass
