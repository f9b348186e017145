"""Delta updates (issue 14, docs/delta.md): detools patches from a product's earlier packages, built
one at a time in a process of their own, stored beside the packages and offered to the devices
that run the patch's base.

A patch's base is identified by a version string: the base package's ``version``, or when it has
none, the version in its ESP-IDF app descriptor (an ESP32 image says what it is). A package with
neither is never a base. A device is offered the patch when the version it last reported
(``currentVersion``; a xiaozhi board's ``application.version``, or its ``elf_sha256`` against the
base image's) equals the base's, and that version names one image of the product
(otad.service.delta_bases).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiofiles

from otad.errors import InvalidInput, NotFound, OtadError
from otad.firmware import FirmwareStore
from otad.model import DeltaRecord, PackageRecord, StillUsed
from otad.service import delta_build
from otad.service.delta_bases import BaseImages
from otad.service.offers import Offer
from otad.service.packages import PackageCatalog
from otad.service.validation import parse_int

log = logging.getLogger(__name__)

MAX_IMAGE = 32 * 1024**2  # detools holds both images and a suffix array: ESP32 apps are a few MB
AUTO_BASES = 3  # an upload builds patches from this many of the product's latest earlier packages
BUILD_TIMEOUT = 900.0  # seconds one patch may take before its process is killed
QUEUE_LIMIT = 64  # uploads waiting for their patches (auto mode); beyond it they are skipped, logged
NAMES_REFRESH = 1.0  # seconds: a name not among the patches read again at most this often (other nodes' patches)
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class DeltaOutcome:
    """What building from one base gave: the patch, or why there is none."""

    base_package_id: int
    base_version: str | None
    patch: DeltaRecord | None
    note: str | None = None


def delta_fields(patch: DeltaRecord) -> dict[str, Any]:
    """The ``delta`` object an offer carries (after the seed's keys)."""
    return {"fileName": patch.file_name, "md5": patch.md5, "sha256": patch.sha256, "size": patch.size,
            "base": patch.base_version}


class DeltaOffers:
    """The OfferExtension that adds ``delta`` to the offers of devices that run a patch's base."""

    def __init__(self, store, bases: BaseImages) -> None:
        self._store = store  # the composition root's otad.store.store.Store
        self._bases = bases

    async def extend(self, package: PackageRecord, offers: list[Offer]) -> None:
        if not offers:
            return
        by_version = await self._bases.by_version(package)
        if not by_version:
            return
        unknown = [offer.device_name for offer in offers if offer.current_version is None]
        reported = await self._store.deltas.reported_versions(unknown, set(by_version)) if unknown else {}
        for offer in offers:
            patch = by_version.get(offer.current_version or reported.get(offer.device_name))
            if patch is not None:
                offer.fields["delta"] = delta_fields(patch)


class DeltaCatalog:
    """Builds, lists and finds patches. ``auto``: every upload queues its patches for the worker."""

    def __init__(self, store, firmware: FirmwareStore, packages: PackageCatalog, bases: BaseImages,
                 scratch_dir: Path, auto: bool = False) -> None:
        self._store = store
        self._firmware = firmware
        self._bases = bases
        self._scratch = scratch_dir
        self._one_at_a_time = asyncio.Lock()
        self._queue: asyncio.Queue[int] = asyncio.Queue(QUEUE_LIMIT)
        self._worker: asyncio.Task | None = None
        self._scratch_cleared = False
        self._listeners: list[Callable[[], object]] = []
        # The file names of every patch, so a download of a name that is neither a package nor a
        # patch (anyone may ask) costs no query: as many as the patches, read again after a change
        # here, and on a miss at most every NAMES_REFRESH seconds (a patch another node built).
        self._names: set[str] | None = None
        self._names_read_at = 0.0
        self._changes = 0  # a read across a change must not keep what it read
        packages.on_delete(self._patches_changed)
        if auto:
            packages.on_upload(self.queue)

    def on_change(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` after a patch was stored here (cached offers are out of date)."""
        self._listeners.append(listener)

    async def list(self, raw_id: object = None) -> list[DeltaRecord]:
        if raw_id is None or raw_id == "":
            return await self._store.deltas.list()
        return await self._store.deltas.of_package(parse_int(raw_id, "id"))

    async def find_by_file(self, file_name: str) -> DeltaRecord | None:
        if file_name not in await self._patch_names(file_name):
            return None
        return await self._store.deltas.find_by_file(file_name)

    async def _patch_names(self, wanted: str) -> set[str]:
        names = self._names
        if names is None or (wanted not in names and time.monotonic() - self._names_read_at >= NAMES_REFRESH):
            changes, read_at = self._changes, time.monotonic()
            names = await self._store.deltas.file_names()
            if changes == self._changes:
                self._names, self._names_read_at = names, read_at
        return names

    def _patches_changed(self, _file_name: object = None) -> None:
        self._changes += 1
        self._names = None

    async def file_names(self) -> set[str]:
        return await self._store.deltas.file_names()

    # --- building ---

    async def build(self, raw_id: object, raw_base: object = None) -> list[DeltaOutcome]:
        """Build the patches to package ``raw_id`` now: from package ``raw_base``, or from the
        product's latest earlier packages. Bad input raises before anything is built."""
        package = await self._package(parse_int(raw_id, "id"))
        if raw_base is not None and raw_base != "":
            base_id = parse_int(raw_base, "base")
            if base_id == package.id:
                raise InvalidInput(f"参数无效: package {package.id} cannot be the base of its own patch")
            base = await self._package(base_id)
            if base.product_id != package.product_id:
                raise InvalidInput(f"参数无效: package {base.id} belongs to product {base.product_id}, "
                                   f"package {package.id} to product {package.product_id}")
            bases = [base]
        else:
            bases = await self._earlier(package)
            if not bases:
                raise InvalidInput(f"参数无效: product {package.product_id} has no package before {package.id} "
                                   "to build a patch from")
        for image in (package, *bases):
            if image.size > MAX_IMAGE:
                raise InvalidInput(f"参数无效: package {image.id} is {image.size} bytes; patches are built "
                                   f"for images up to {MAX_IMAGE} bytes")
        return [await self._build_from(package, base, explicit=raw_base not in (None, "")) for base in bases]

    def queue(self, package: PackageRecord) -> None:
        """Auto mode: build ``package``'s patches in the background (the upload does not wait)."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="otad-delta-builder")
        try:
            self._queue.put_nowait(package.id)
        except asyncio.QueueFull:
            log.warning("delta patches for package %d skipped: %d uploads already wait for theirs "
                        "(build them with POST /api/v2/otaDelta)", package.id, QUEUE_LIMIT)

    async def _work(self) -> None:
        while True:
            package_id = await self._queue.get()
            try:
                outcomes = await self.build(package_id)
                built = [o for o in outcomes if o.patch is not None]
                log.info("package %d: %d delta patch(es) built in the background", package_id, len(built))
            except OtadError as exc:
                log.info("package %d: no delta patch built: %s", package_id, exc.message)
            except Exception:
                log.exception("package %d: building its delta patches failed", package_id)

    async def aclose(self) -> None:
        """Stop the background worker (a build in progress is killed)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _package(self, package_id: int) -> PackageRecord:
        package = await self._store.repo.find_package_by_id(package_id)
        if package is None:
            raise NotFound(f"参数无效: no package with id {package_id}")
        return package

    async def _earlier(self, package: PackageRecord) -> list[PackageRecord]:
        # The product's packages come oldest first (by id) from the store's own product query.
        earlier = [p for p in await self._store.deltas.product_packages(package.product_id) if p.id < package.id]
        return earlier[::-1][:AUTO_BASES]

    async def _build_from(self, package: PackageRecord, base: PackageRecord, explicit: bool) -> DeltaOutcome:
        version, elf = await self._bases.identity(base)
        note = await self._unfit(package, base, version)
        if note is not None:
            if explicit and base.sha256 != package.sha256:  # the same image again is no error
                raise InvalidInput(f"参数无效: {note}")
            return DeltaOutcome(base.id, version, None, note)
        async with self._one_at_a_time:
            if not explicit:  # auto mode and an on-demand build of the same upload: built once
                built = [p for p in await self._store.deltas.of_package(package.id) if p.base_package_id == base.id]
                if built:
                    return DeltaOutcome(base.id, version, built[0], "built before (name this base to build it again)")
            patch = await self._make(package, base, version, elf)
        if patch is None:
            return DeltaOutcome(base.id, version, None, "the patch would not be smaller than the image")
        self._patches_changed()
        for listener in self._listeners:
            listener()
        log.info("delta patch %s: package %d from %d (version %s), %d of %d bytes", patch.file_name, package.id,
                 base.id, version, patch.size, package.size)
        return DeltaOutcome(base.id, version, patch)

    async def _unfit(self, package: PackageRecord, base: PackageRecord, version: str | None) -> str | None:
        """Why no device could be told which image ``base`` is, or None when one can."""
        if version is None:
            return (f"package {base.id} has no version (none given at upload, and not an ESP-IDF image), "
                    "so no device could be matched with it")
        if base.sha256 == package.sha256:
            return "the same image"
        if (await self._bases.identity(package))[0] == version:
            return (f"package {base.id} has the version of package {package.id} ({version}): a device on "
                    f"{version} may run either")
        if await self._bases.ambiguous(package.product_id, {version}):
            return (f"two or more packages of product {package.product_id} say they are version {version} "
                    "and differ: a device on it could run any of them")
        return None

    async def _make(self, package: PackageRecord, base: PackageRecord, version: str,
                    elf: str | None) -> DeltaRecord | None:
        await asyncio.to_thread(self._prepare_scratch)
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="delta-", dir=self._scratch))
        try:
            from_path = await self._local_copy(base, work / "from")
            to_path = await self._local_copy(package, work / "to")
            built = await _run_builder(from_path, to_path, work / "patch")
            if built["size"] >= package.size:
                return None
            stored = await self._firmware.receive(_file_chunks(work / "patch"), "delta.patch", package.size)
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, work, True))
        try:
            patch, replaced = await self._store.deltas.save(
                package_id=package.id, base_id=base.id, base_version=version, base_elf_sha256=elf,
                file_name=stored.file_name, size=stored.size, md5=stored.md5, sha256=stored.sha256,
                compression=delta_build.COMPRESSION)
        except BaseException as exc:
            await self._firmware.discard(stored.file_name)
            if isinstance(exc, StillUsed):
                raise NotFound("参数无效: the package or its base was deleted while the patch was built") from None
            raise
        if replaced is not None:
            await self._firmware.discard(replaced)
        return patch

    def _prepare_scratch(self) -> None:
        """The scratch directory, emptied once per process of what a crash left there."""
        if not self._scratch_cleared:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch_cleared = True
        self._scratch.mkdir(parents=True, exist_ok=True)

    async def _local_copy(self, package: PackageRecord, where: Path) -> Path:
        """A path to the package's bytes on this machine: the store's own file, or a copy."""
        path = self._firmware.path_of(package.file_name)
        if path is not None and await asyncio.to_thread(path.is_file):
            return path
        reading = await self._firmware.read(package.file_name, 0, package.size)
        if reading is None:
            raise NotFound(f"参数无效: the file of package {package.id} is missing from the firmware store")
        try:
            async with aiofiles.open(where, "wb") as out:
                async for chunk in reading:
                    await out.write(chunk)
        finally:
            await reading.aclose()
        return where


async def _run_builder(from_path: Path, to_path: Path, patch_path: Path) -> dict:
    """``otad.service.delta_build`` in a process of its own; killed when cancelled or too slow."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "otad.service.delta_build", str(from_path), str(to_path), str(patch_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), BUILD_TIMEOUT)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.shield(process.wait())
        if isinstance(exc, TimeoutError):
            raise OtadError(f"失败: building the delta patch took over {BUILD_TIMEOUT:.0f} s") from None
        raise
    if process.returncode != 0:
        raise OtadError(f"失败: building the delta patch failed: {err.decode(errors='replace').strip()[:300]}")
    return json.loads(out)


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    async with aiofiles.open(path, "rb") as handle:
        while chunk := await handle.read(_CHUNK):
            yield chunk
