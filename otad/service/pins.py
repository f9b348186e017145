"""Passive OTA: an admin pins a package for a device; the device polls and downloads it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from otad.errors import InvalidInput, NotFound
from otad.service.clock import utc_now
from otad.service.devices import DeviceRegistry
from otad.service.offers import Offer, Offers
from otad.service.validation import check_package_name, optional_text, parse_int, required_text
from otad.model import PassivePinRecord


class PassivePins:
    def __init__(self, store, devices: DeviceRegistry, offers: Offers | None = None,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._devices = devices
        self._offers = offers or Offers()
        self._clock = clock
        # Device name -> (the pin, the device's reported version, the offer built from both): rebuilt
        # when the pin or the version changes (a delta patch is from that version) or the offer is
        # about to expire (a signed one carries an expiry).
        self._offer_cache: dict[str, tuple[PassivePinRecord, str | None, Offer]] = {}
        # Device name -> (its pin, the version it reported), for the poll devices repeat all day.
        # Filled on a poll, dropped on every change that could alter an answer: a pin saved or
        # deleted, the device deleted, a report of another version, a package or patch changed.
        self._poll_cache: dict[str, tuple[PassivePinRecord, str | None]] = {}
        self._changes = 0  # a poll that read the database across a change must not cache what it read
        self._listeners: list[Callable[[str | None], object]] = []
        devices.on_delete(self.forget)

    def on_change(self, listener: Callable[[str | None], object]) -> None:
        """Call ``listener(device_name)`` after a pin changed here (None: some pin was deleted), so
        the other nodes drop their cached answer (otad.cache_sync)."""
        self._listeners.append(listener)

    def forget(self, device_name: str | None = None) -> None:
        """Drop the cached pin of ``device_name`` (every one when None)."""
        self._changes += 1
        if device_name is None:
            self._poll_cache.clear()
            self._offer_cache.clear()
        else:
            self._poll_cache.pop(device_name, None)
            self._offer_cache.pop(device_name, None)

    def version_reported(self, device_name: str, version: str) -> None:
        """``device_name`` reported running ``version`` (written already): an answer cached for the
        version it ran before may carry a patch from that version."""
        cached = self._poll_cache.get(device_name)
        if cached is not None and cached[1] != version:
            self.forget(device_name)

    def _changed(self, device_name: str | None) -> None:
        self.forget(device_name)
        for listener in self._listeners:
            listener(device_name)

    async def pin(self, body: object) -> PassivePinRecord:
        """``{"deviceName","name","description","versionName"}``: pin (or re-pin) the device's package."""
        if not isinstance(body, dict):
            raise InvalidInput('参数无效: expected {"deviceName", "name", "description", "versionName"}')
        device = await self._devices.get(body.get("deviceName"))
        name = check_package_name(body.get("name"))
        version_name = required_text(body.get("versionName"), "versionName", 128)
        description = optional_text(body.get("description"), "description", 4096)
        package = await self._store.repo.find_package(device.product_id, name)
        if package is None:
            raise NotFound(f"参数无效: product {device.product_id} has no package named '{name}'")
        saved = await self._store.repo.save_passive_pin(device.id, package.id, version_name, description)
        self._changed(device.name)
        return saved

    async def for_device(self, device_name: object) -> PassivePinRecord:
        """What a polling device is told; NotFound (1001) for an unknown device or one with no pin."""
        return (await self._pin_and_version(device_name))[0]

    async def _pin_and_version(self, device_name: object) -> tuple[PassivePinRecord, str | None]:
        if isinstance(device_name, str) and (cached := self._poll_cache.get(device_name)) is not None:
            return cached
        changes = self._changes
        device = await self._devices.get(device_name)
        pin = await self._store.repo.find_passive_pin(device.name)
        if pin is None:
            raise NotFound(f"参数无效: no passive upgrade is set for device '{device.name}'")
        found = (pin, device.firmware_version)
        if changes == self._changes:
            self._poll_cache[device.name] = found
        return found

    async def offer(self, device_name: object) -> Offer:
        """The reply a polling device reads (its ``url`` left to the transport); the same object
        until it would change, so a transport may cache what it rendered from it."""
        pin, version = await self._pin_and_version(device_name)
        cached = self._offer_cache.get(pin.device_name)
        if cached is not None and cached[0] is pin and cached[1] == version and not self._expiring(cached[2]):
            return cached[2]
        offer = await self._offers.passive(pin, version)
        self._offer_cache[pin.device_name] = (pin, version, offer)  # as bounded as the pins: one per device with one
        return offer

    def _expiring(self, offer: Offer) -> bool:
        """Rebuilt in its last minute, so no device reads one that expires before it acts on it."""
        return offer.expires_at is not None and offer.expires_at - self._clock() < timedelta(minutes=1)

    async def list(self) -> list[PassivePinRecord]:
        return await self._store.repo.list_passive_pins()

    async def delete(self, raw_id: object) -> None:
        pin_id = parse_int(raw_id, "id")
        if not await self._store.repo.delete_passive_pin(pin_id):
            raise NotFound(f"参数无效: no passive pin with id {pin_id}")
        self._changed(None)  # pins are few and rarely deleted; no need to find the device
