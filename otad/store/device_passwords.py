"""Devices' MQTT password hashes replaced in one transaction (``otad device reset-password``)."""

from __future__ import annotations

from tortoise.transactions import in_transaction

from otad.store.failures import translate_storage_errors
from otad.store.models import Device
from otad.store.transactions import shielded


class DevicePasswords:
    """Devices' MQTT password hashes."""

    @translate_storage_errors
    @shielded
    async def set_password_hashes(self, hashes: dict[str, str]) -> None:
        """Give each named device its new hash, all or none."""
        async with in_transaction():
            for name, hashed in hashes.items():
                await Device.filter(name=name).update(password_hash=hashed)
