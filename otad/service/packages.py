"""Firmware packages: upload, list, delete."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from otad.errors import Conflict, NotFound, StillReferenced, StorageUnavailable
from otad.service.health import DATABASE, FIRMWARE, StorageHealth
from otad.firmware import FirmwareStore
from otad.model import LIVE_CAMPAIGN_STATES, Duplicate, PackageRecord, StillUsed, UpgradeState
from otad.service.upgrades import UpgradeService
from otad.service.validation import check_package_name, optional_text, parse_int, safe_text

log = logging.getLogger(__name__)


class PackageCatalog:
    def __init__(self, store, firmware: FirmwareStore, upgrades: UpgradeService, max_upload_size: int,
                 health: StorageHealth) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._firmware = firmware
        self._upgrades = upgrades
        self._health = health
        self._max_upload_size = max_upload_size
        # file name -> package, for the download path every device takes (packages never change;
        # a deleted one is dropped here before its file is removed).
        self._by_file: dict[str, PackageRecord] = {}
        self._deletions = 0  # a lookup that raced a deletion must not cache the deleted package
        self._delete_listeners: list[Callable[[str], object]] = []
        self._upload_listeners: list[Callable[[PackageRecord], object]] = []

    @property
    def max_upload_size(self) -> int:
        return self._max_upload_size

    async def check_new(self, name: object, product_id: object) -> tuple[str, int]:
        """Validate an upload's parameters before its body is read, so a bad one costs nothing."""
        name, product_id = check_package_name(name), parse_int(product_id, "productId")
        if await self._store.repo.find_package(product_id, name) is not None:
            raise Conflict(f"参数无效: product {product_id} already has a package named '{name}'")
        return name, product_id

    async def upload(
        self, *, name: str, product_id: int, original_name: str | None, chunks: AsyncIterator[bytes],
        version: str | None = None, description: str | None = None,
    ) -> PackageRecord:
        """Store the file and record the package; on any failure neither file nor row remains."""
        name, product_id = await self.check_new(name, product_id)
        version = optional_text(version, "version", 128)
        description = optional_text(description, "description", 4096)
        try:
            stored = await self._firmware.receive(chunks, original_name, self._max_upload_size)
        except StorageUnavailable as exc:
            self._health.failing(FIRMWARE, exc.message)
            raise
        self._health.ok(FIRMWARE)
        try:
            package = await self._store.repo.insert_package(
                product_id=product_id, name=name, file_name=stored.file_name,
                original_name=safe_text(original_name or stored.file_name, 255), size=stored.size, md5=stored.md5,
                sha256=stored.sha256, version=version, description=description,
            )
        except Duplicate:
            await self._firmware.discard(stored.file_name)
            raise Conflict(f"参数无效: product {product_id} already has a package named '{name}'") from None
        except BaseException as exc:
            await self._firmware.discard(stored.file_name)
            if isinstance(exc, StorageUnavailable):
                self._health.failing(DATABASE, exc.message)
            raise
        log.info("package %d '%s' (product %d) stored as %s, %d bytes, md5 %s",
                 package.id, name, product_id, stored.file_name, stored.size, stored.md5)
        for listener in self._upload_listeners:
            listener(package)
        return package

    def on_upload(self, listener: Callable[[PackageRecord], object]) -> None:
        """Call ``listener(package)`` after a package was stored (auto delta patches queue it)."""
        self._upload_listeners.append(listener)

    async def list(self) -> list[PackageRecord]:
        return await self._store.repo.list_packages()

    def on_delete(self, listener: Callable[[str], object]) -> None:
        """Call ``listener(file_name)`` after a package was deleted here (the other nodes' caches)."""
        self._delete_listeners.append(listener)

    def forget(self, file_name: str | None = None) -> None:
        """Drop the cached package stored as ``file_name`` (every one when None): deleted elsewhere."""
        self._deletions += 1
        if file_name is None:
            self._by_file.clear()
        else:
            self._by_file.pop(file_name, None)

    async def find_by_file(self, file_name: str) -> PackageRecord | None:
        package = self._by_file.get(file_name)
        if package is None:
            deletions = self._deletions
            package = await self._store.repo.find_package_by_file(file_name)
            if package is not None and deletions == self._deletions:
                self._by_file[file_name] = package
        return package

    async def delete(self, raw_id: object) -> None:
        """Delete a package and its file; upgrades still pointing at it are cancelled."""
        package_id = parse_int(raw_id, "id")
        package = await self._store.repo.find_package_by_id(package_id)
        if package is None:
            raise NotFound(f"参数无效: no package with id {package_id}")
        users = await self._store.repo.package_users(package.id, LIVE_CAMPAIGN_STATES)
        if users:
            raise StillReferenced(f"存在依赖关系，无法删除: used by {', '.join(users)}; delete or end those first")
        in_use = StillReferenced("存在依赖关系，无法删除: a pin or campaign was added meanwhile")
        patches = await self._store.deltas.files_of(package.id)  # their rows go with the package's
        cancelled = await self._upgrades.end_open(state=UpgradeState.CANCELLED, detail="package deleted",
                                                  package_id=package.id)
        try:
            await self._store.repo.delete_package(package.id)
        except StillUsed:
            raise in_use from None
        self.forget(package.file_name)
        for listener in self._delete_listeners:
            listener(package.file_name)
        await self._firmware.discard(package.file_name)
        for file_name in patches:
            await self._firmware.discard(file_name)
        log.info("package %d '%s' deleted with %d delta patch(es); %d pending upgrade(s) cancelled", package.id,
                 package.name, len(patches), cancelled)
