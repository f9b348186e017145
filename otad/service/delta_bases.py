"""Which image a base version names (issue 14, docs/delta.md).

A patch turns one exact image into another: applied to any other image it writes garbage into the
device's next partition. Devices are matched with a patch's base by the version they report, and a
version string is not unique within a product (a package rebuilt as "1.0" again, or one without a
version whose app descriptor says "1.0"). So a version is only trusted as a base when it names one
image of the product: when two of its packages say they are that version but differ in bytes, no
device on that version is offered a patch.
"""

from __future__ import annotations

from otad.firmware import FirmwareStore
from otad.model import DeltaRecord, PackageRecord
from otad.service import delta_build


class BaseImages:
    """A product's images by the version they say they are; the patches a device may be offered."""

    def __init__(self, store, firmware: FirmwareStore) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._firmware = firmware
        # Package file name -> (version, ELF sha256) of its ESP-IDF app descriptor. A package never
        # changes, so an entry holds until the package is deleted (``forget``): one per package.
        self._descriptors: dict[str, tuple[str | None, str | None]] = {}

    def forget(self, file_name: str | None = None) -> None:
        """Drop what was read of the package stored as ``file_name`` (every one when None)."""
        if file_name is None:
            self._descriptors.clear()
        else:
            self._descriptors.pop(file_name, None)

    async def identity(self, package: PackageRecord) -> tuple[str | None, str | None]:
        """The package's version (its own, else its app descriptor's) and its ELF hash."""
        version, elf = await self._descriptor(package)
        return package.version or version, elf

    async def ambiguous(self, product_id: int, versions: set[str]) -> set[str]:
        """Those of ``versions`` that two or more different images of the product say they are."""
        images: dict[str, set[str]] = {}
        for package in await self._store.deltas.product_packages(product_id):
            version = package.version or (await self._descriptor(package))[0]
            if version in versions:
                images.setdefault(version, set()).add(package.sha256)
        return {version for version, hashes in images.items() if len(hashes) > 1}

    async def by_version(self, package: PackageRecord,
                         patches: list[DeltaRecord] | None = None) -> dict[str, DeltaRecord]:
        """Base version -> the patch to ``package`` from it, for the versions that name one image."""
        if patches is None:
            patches = await self._store.deltas.of_package(package.id)
        found: dict[str, DeltaRecord] = {}
        for patch in patches:  # two patches from one version: the same image (else it is ambiguous)
            found.setdefault(patch.base_version, patch)
        if found:
            for version in await self.ambiguous(package.product_id, set(found)):
                del found[version]
        return found

    async def board_patch(self, package: PackageRecord, version: str | None,
                          elf_sha256: str | None) -> DeltaRecord | None:
        """The patch to ``package`` for a xiaozhi board running ``version`` with ELF ``elf_sha256``:
        by the ELF hash (it names one build), else by the version, unless the board's ELF hash and
        the base's are both known and differ (the board runs another build of that version)."""
        patches = await self._store.deltas.of_package(package.id)
        if not patches:
            return None
        elf = elf_sha256.lower() if elf_sha256 else None
        if elf is not None:
            for patch in patches:
                if patch.base_elf_sha256 == elf:
                    return patch
        patch = (await self.by_version(package, patches)).get(version) if version else None
        if patch is not None and elf is not None and patch.base_elf_sha256 is not None:
            return None  # both hashes known and not equal (an equal one was returned above)
        return patch

    async def _descriptor(self, package: PackageRecord) -> tuple[str | None, str | None]:
        found = self._descriptors.get(package.file_name)
        if found is None:
            head = await self._read_head(package)
            found = delta_build.app_descriptor(head)
            if head:  # a missing file is read again next time
                self._descriptors[package.file_name] = found
        return found

    async def _read_head(self, package: PackageRecord) -> bytes:
        reading = await self._firmware.read(package.file_name, 0, min(delta_build.APP_HEAD, package.size))
        if reading is None:
            return b""
        try:
            return b"".join([chunk async for chunk in reading])
        finally:
            await reading.aclose()
