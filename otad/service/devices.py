"""The device registry: devices, their product and their MQTT password."""

from __future__ import annotations

from dataclasses import dataclass

from otad.errors import Conflict, InvalidInput, MissingInput, NotFound
from otad.service import credentials
from otad.service.ports import Publisher
from otad.store import repo
from otad.service.validation import DEVICE_NAME, check_device_name, parse_int
from otad.store.records import DeviceRecord

MAX_BULK = 10_000


@dataclass(frozen=True)
class NewDevice:
    name: str
    product_id: int
    password: str  # shown once, stored hashed


class DeviceRegistry:
    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def add(self, items: list[dict] | dict) -> list[NewDevice]:
        """Register one device or many, all or nothing; returns each new password once."""
        items = items if isinstance(items, list) else [items]
        if not items:
            raise MissingInput("参数缺失: no devices given")
        if len(items) > MAX_BULK:
            raise InvalidInput(f"参数无效: at most {MAX_BULK} devices per request")
        new: list[NewDevice] = []
        for item in items:
            if not isinstance(item, dict):
                raise InvalidInput('参数无效: each device is an object {"deviceName", "productId"}')
            name = check_device_name(item.get("deviceName"))
            new.append(NewDevice(name, parse_int(item.get("productId"), "productId"), credentials.new_secret()))
        names = [device.name for device in new]
        if len(set(names)) != len(names):
            raise Conflict("参数无效: the same deviceName is given twice")
        try:
            await repo.insert_devices((d.name, d.product_id, credentials.hash_secret(d.password)) for d in new)
        except repo.Duplicate as exc:
            raise Conflict(f"参数无效: device already exists: {exc}") from None
        return new

    async def get(self, name: str) -> DeviceRecord:
        device = await repo.find_device(check_device_name(name))
        if device is None:
            raise NotFound(f"参数无效: no device named '{name}'")
        return device

    async def list(self) -> list[DeviceRecord]:
        return await repo.list_devices()

    async def delete(self, name: str) -> None:
        if not await repo.delete_device(check_device_name(name)):
            raise NotFound(f"参数无效: no device named '{name}'")
        await self._publisher.forget_device(name)

    async def check_mqtt_login(self, username: str | None, password: str | bytes | None) -> bool:
        """True when ``username`` is a registered device and ``password`` is its password."""
        if not username or password is None or not DEVICE_NAME.fullmatch(username):
            return False
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        device = await repo.find_device(username)
        return device is not None and credentials.secret_matches(password, device.password_hash)
