"""xiaozhi-esp32 boards: per-product pins and the board's OTA check (protocol.md section 3)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from otad.errors import InvalidInput, MissingInput, NotFound
from otad.service import credentials
from otad.service.clock import utc_now
from otad.service.validation import check_device_name, parse_int, safe_text
from otad.service.versions import is_newer, parse_dotted
from otad.store import repo
from otad.store.records import DeviceRecord, Inventory, PackageRecord, XiaozhiPinRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BoardCheck:
    """What a board sent: its Device-Id header and JSON body, and where it came from."""

    device_id: str
    body: dict
    remote_addr: str | None


@dataclass(frozen=True)
class Offer:
    """The firmware answer: ``package`` is None when the board keeps what it runs."""

    version: str
    package: PackageRecord | None
    force: bool


def _text(value: object, limit: int) -> str | None:
    return safe_text(value, limit) if isinstance(value, str) and value else None


def _inventory(check: BoardCheck, now: datetime) -> Inventory:
    body = check.body
    application = body.get("application") if isinstance(body.get("application"), dict) else {}
    board = body.get("board") if isinstance(body.get("board"), dict) else {}
    return Inventory(
        app_version=_text(application.get("version"), 64),
        board_type=_text(board.get("type"), 128),
        board_name=_text(board.get("name"), 128),
        chip=_text(body.get("chip_model_name"), 64),
        elf_sha256=_text(application.get("elf_sha256"), 64),
        remote_addr=_text(check.remote_addr, 64),
        last_check_at=now,
    )


class XiaozhiBoards:
    def __init__(self, default_product_id: int | None,
                 now=utc_now) -> None:
        self._default_product_id = default_product_id
        self._now = now

    # --- admin: one pin per product ---

    async def pin(self, body: object) -> XiaozhiPinRecord:
        """``{"otaId","productId","versionName","force"?}``: offer package otaId to the product's boards."""
        if not isinstance(body, dict):
            raise InvalidInput('参数无效: expected {"otaId", "productId", "versionName"}')
        package_id = parse_int(body.get("otaId"), "otaId")
        product_id = parse_int(body.get("productId"), "productId")
        raw_version = body.get("versionName")
        if raw_version is None or raw_version == "":
            raise MissingInput("参数缺失: versionName")
        if parse_dotted(raw_version) is None:
            # Boards compare versions as dotted integers and break on anything else; a JSON number
            # would also lose digits (1.10 reads as 1.1).
            raise InvalidInput('参数无效: versionName must be a string of dotted integers such as "1.9.3", '
                               "because xiaozhi boards compare versions numerically")
        force = body.get("force", False)
        if force not in (True, False, 0, 1):
            raise InvalidInput("参数无效: force must be true or false")
        package = await repo.find_package_by_id(package_id)
        if package is None or package.product_id != product_id:
            raise InvalidInput(f"参数无效: product {product_id} has no package with id {package_id}")
        return await repo.save_xiaozhi_pin(product_id, package_id, raw_version, bool(force))

    async def list(self) -> list[XiaozhiPinRecord]:
        return await repo.list_xiaozhi_pins()

    async def delete(self, raw_id: object) -> None:
        pin_id = parse_int(raw_id, "id")
        if not await repo.delete_xiaozhi_pin(pin_id):
            raise NotFound(f"参数无效: no xiaozhi pin with id {pin_id}")

    # --- the board's check ---

    async def check(self, check: BoardCheck) -> Offer:
        """Record what the board reported and decide whether to offer it the pinned firmware."""
        try:
            name = check_device_name(check.device_id.strip().lower())
        except InvalidInput:
            raise InvalidInput("参数无效: Device-Id must be the board's MAC address") from None
        application = check.body.get("application")
        current = application.get("version") if isinstance(application, dict) else None
        current = current if isinstance(current, str) else ""
        device = await self._device(name)
        if device is None:
            return Offer(version=current, package=None, force=False)
        await repo.save_inventory(device.id, _inventory(check, self._now()))
        pin = await repo.find_xiaozhi_pin(device.product_id)
        if pin is None:
            return Offer(version=current, package=None, force=False)
        current_parsed = parse_dotted(current)
        wanted = parse_dotted(pin.version_name)
        if pin.force or (current_parsed is not None and wanted is not None and is_newer(wanted, current_parsed)):
            log.info("xiaozhi board %s (%s) offered %s", name, current or "unknown version", pin.version_name)
            return Offer(version=pin.version_name, package=pin.package, force=pin.force)
        return Offer(version=current, package=None, force=False)

    async def _device(self, name: str) -> DeviceRecord | None:
        """The registered board, registering an unknown one into the default product if configured."""
        device = await repo.find_device(name)
        if device is not None or self._default_product_id is None:
            return device
        try:
            # The board never logs in to our broker; its password only has to exist, unknown to anyone.
            await repo.insert_devices([(name, self._default_product_id,
                                        credentials.hash_secret(credentials.new_secret()))])
            log.info("xiaozhi board %s registered into product %d", name, self._default_product_id)
        except repo.Duplicate:
            pass  # registered by a concurrent check
        return await repo.find_device(name)
