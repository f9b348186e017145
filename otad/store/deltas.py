"""Delta patches (issue 14): rows of ``delta_patch``, one per (package, base package).

Deleting a package deletes its rows either way round (ON DELETE CASCADE); the files are the
package deletion's to discard (``files_of`` before it)."""

from __future__ import annotations

from tortoise.exceptions import IntegrityError
from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from otad.model import DeltaRecord, PackageRecord, StillUsed
from otad.store.models import DeltaPatch, Device, Package
from otad.store.repo import _package
from otad.store.transactions import shielded

# Device names per query when matching a campaign step's devices with their reported versions:
# below SQLite's and asyncpg's limit of 32,766 bound parameters.
_NAMES_PER_QUERY = 10_000


def _record(row: DeltaPatch) -> DeltaRecord:
    return DeltaRecord(id=row.id, package_id=row.package_id, base_package_id=row.base_id,
                       base_version=row.base_version, base_elf_sha256=row.base_elf_sha256, file_name=row.file_name,
                       size=row.size, md5=row.md5, sha256=row.sha256, compression=row.compression,
                       created_at=row.created_at, target_file_name=row.package.file_name)


class Deltas:
    @shielded
    async def save(self, *, package_id: int, base_id: int, base_version: str, base_elf_sha256: str | None,
                   file_name: str, size: int, md5: str, sha256: str, compression: str) -> tuple[DeltaRecord, str | None]:
        """Record a patch, replacing the one from the same base: (the record, the replaced patch's
        file name or None). Raises StillUsed when either package was deleted meanwhile."""
        try:
            async with in_transaction():
                old = await DeltaPatch.get_or_none(package_id=package_id, base_id=base_id)
                if old is not None:
                    await old.delete()
                row = await DeltaPatch.create(package_id=package_id, base_id=base_id, base_version=base_version,
                                              base_elf_sha256=base_elf_sha256, file_name=file_name, size=size,
                                              md5=md5, sha256=sha256, compression=compression)
        except IntegrityError:  # a foreign key: the package or its base is gone
            raise StillUsed(package_id) from None
        await row.fetch_related("package")
        return _record(row), old.file_name if old is not None else None

    async def of_package(self, package_id: int) -> list[DeltaRecord]:
        """The patches to ``package_id``, newest base first."""
        rows = await DeltaPatch.filter(package_id=package_id).order_by("-base_id").prefetch_related("package")
        return [_record(row) for row in rows]

    async def list(self) -> list[DeltaRecord]:
        return [_record(row) for row in await DeltaPatch.all().order_by("id").prefetch_related("package")]

    async def find_by_file(self, file_name: str) -> DeltaRecord | None:
        row = await DeltaPatch.get_or_none(file_name=file_name).prefetch_related("package")
        return _record(row) if row is not None else None

    async def files_of(self, package_id: int) -> list[str]:
        """The files of every patch to or from ``package_id`` (what deleting it leaves behind)."""
        return await DeltaPatch.filter(Q(package_id=package_id) | Q(base_id=package_id)).values_list(
            "file_name", flat=True)

    async def product_packages(self, product_id: int) -> list[PackageRecord]:
        """Every package of ``product_id`` (which images a base version could name)."""
        return [_package(row) for row in await Package.filter(product_id=product_id).order_by("id")]

    async def file_names(self) -> set[str]:
        return set(await DeltaPatch.all().values_list("file_name", flat=True))

    async def reported_versions(self, device_names: list[str], versions: set[str]) -> dict[str, str]:
        """Device name -> the version it reported, for those of ``device_names`` that reported one of
        ``versions`` (one query per 10,000 names)."""
        found: dict[str, str] = {}
        for start in range(0, len(device_names), _NAMES_PER_QUERY):
            rows = await Device.filter(name__in=device_names[start:start + _NAMES_PER_QUERY],
                                       firmware_version__in=sorted(versions)).values_list("name", "firmware_version")
            found.update(rows)
        return found
