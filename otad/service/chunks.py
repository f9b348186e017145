"""Firmware over MQTT in chunks (docs/chunks.md), for devices without an HTTP stack: a device asks for
``size`` bytes of ``fileName`` from ``offset`` and gets them, or a clear refusal.

Nothing here knows MQTT: a transport hands in a device's request (the payload it published) and
frames the ``ChunkReply`` it gets back. A device may fetch only a file it was offered: its open
upgrade's package, or the package of its passive pin, or a delta patch to one of those (its
command names the patch it can apply; another patch to the same package is no secret). Every read is one range of at most
``max_size`` bytes from the firmware store; a device has at most ``per_device`` transfers in flight
(the transport holds one until the chunk is on its way), otad at most ``TRANSFERS_TOTAL``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from otad.errors import Forbidden, InvalidInput, NotFound, OtadError, TooManyRequests
from otad.firmware import STORED_NAME, FirmwareStore
from otad.model import UpgradeState
from otad.service.deltas import DeltaCatalog
from otad.service.packages import PackageCatalog
from otad.service.pins import PassivePins
from otad.service.reports import Reports
from otad.service.upgrades import UpgradeService

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024  # a request is three small fields and an optional id
MAX_ID_LENGTH = 64  # as AWS IoT's client token
MAX_FILE_NAME_LENGTH = 64  # a stored name is 47 characters at most
TRANSFERS_TOTAL = 256  # chunks being read and sent at once, every device together: bounds memory
_UNSET = object()


class ChunkRefused(Exception):
    """A request refused: ``error`` carries the envelope's code and message, ``reason`` a short
    word a device can switch on."""

    def __init__(self, error: OtadError, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = reason


@dataclass(frozen=True)
class ChunkRequest:
    file_name: str
    offset: int
    size: int
    request_id: str | int | None = None


@dataclass(frozen=True)
class ChunkReply:
    """What goes back to the device: ``header`` (the envelope: ``data`` describes the bytes, or the
    request refused) and ``data``, the chunk's bytes (empty in a refusal)."""

    header: dict[str, Any]
    data: bytes = b""

    @property
    def ok(self) -> bool:
        return bool(self.header.get("success"))


@dataclass
class _Slots:
    per_device: int
    total: int
    in_flight: dict[str, int] = field(default_factory=dict)
    count: int = 0

    def take(self, device_name: str) -> None:
        held = self.in_flight.get(device_name, 0)
        if held >= self.per_device:
            raise ChunkRefused(TooManyRequests(f"失败: {held} chunk transfer(s) of this device are in flight; "
                                               f"at most {self.per_device}"), "busy")
        if self.count >= self.total:
            raise ChunkRefused(TooManyRequests("失败: too many chunk transfers in flight; try again later"), "busy")
        self.in_flight[device_name] = held + 1
        self.count += 1

    def give(self, device_name: str) -> None:
        held = self.in_flight.get(device_name, 0) - 1
        if held > 0:
            self.in_flight[device_name] = held
        else:
            self.in_flight.pop(device_name, None)
        self.count -= 1


def parse_request(payload: bytes) -> ChunkRequest:
    """``{"fileName","offset","size"}`` (and an optional ``id``); raises ChunkRefused(badRequest)."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise _bad(f"a chunk request is at most {MAX_REQUEST_BYTES} bytes")
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise _bad('expected JSON {"fileName", "offset", "size"}') from None
    if not isinstance(body, dict):
        raise _bad('expected JSON {"fileName", "offset", "size"}')
    file_name, offset, size = body.get("fileName"), body.get("offset"), body.get("size")
    request_id = body.get("id")
    if request_id is not None and not _is_id(request_id):
        raise _bad(f"id must be a string of at most {MAX_ID_LENGTH} printable ASCII characters or an integer")
    if not isinstance(file_name, str) or not file_name or len(file_name) > MAX_FILE_NAME_LENGTH:
        # Echoed in the reply: a stored name is 47 characters at most, and the header stays small.
        raise _bad(f"fileName must be a string of 1 to {MAX_FILE_NAME_LENGTH} characters")
    if not _is_count(offset) or offset < 0:
        raise _bad("offset must be an integer, 0 or more")
    if not _is_count(size) or size < 1:
        raise _bad("size must be an integer, 1 or more")
    return ChunkRequest(file_name, offset, size, request_id)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value < 2**53


def _is_id(value: object) -> bool:
    if isinstance(value, str):
        return len(value) <= MAX_ID_LENGTH and value.isascii() and value.isprintable()
    return _is_count(value)


def _bad(message: str) -> ChunkRefused:
    return ChunkRefused(InvalidInput(f"参数无效: {message}"), "badRequest")


def _envelope(success: bool, code: int, message: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"success": success, "errorCode": code, "errorMsg": message, "data": data}


def refusal(refused: ChunkRefused, request: ChunkRequest | None) -> ChunkReply:
    """The refusal, with what the request asked for (as far as it could be read) to match it by."""
    data: dict[str, Any] = {"reason": refused.reason}
    if request is not None:
        data.update(fileName=request.file_name, offset=request.offset, size=request.size)
        if request.request_id is not None:
            data["id"] = request.request_id
    return ChunkReply(_envelope(False, refused.error.code, refused.error.message, data))


class FirmwareChunks:
    """The use case: validate a device's chunk request, read the range, note the download."""

    def __init__(self, packages: PackageCatalog, upgrades: UpgradeService, passive: PassivePins, reports: Reports,
                 firmware: FirmwareStore, max_size: int, per_device: int, total: int = TRANSFERS_TOTAL,
                 deltas: DeltaCatalog | None = None) -> None:
        self._packages = packages
        self._upgrades = upgrades
        self._passive = passive
        self._reports = reports
        self._firmware = firmware
        self._deltas = deltas
        self.max_size = max_size
        self._slots = _Slots(per_device, total)

    def in_flight(self, device_name: str) -> int:
        return self._slots.in_flight.get(device_name, 0)

    @contextlib.asynccontextmanager
    async def transfer(self, device_name: str, payload: bytes) -> AsyncIterator[ChunkReply]:
        """The reply to one request. A chunk's transfer slot is held until the block ends: the
        transport ends it once the chunk is on its way (written out, or acknowledged)."""
        request: ChunkRequest | None = None
        try:
            request = parse_request(payload)
            if request.size > self.max_size:
                raise ChunkRefused(InvalidInput(f"参数无效: chunk too large: size {request.size} is more than "
                                                f"{self.max_size} bytes"), "tooLarge")
            self._slots.take(device_name)
        except ChunkRefused as refused:
            yield refusal(refused, request)
            return
        try:
            try:
                reply = await self._read(device_name, request)
            except ChunkRefused as refused:
                reply = refusal(refused, request)
            except OtadError as error:  # the database or the store is unavailable: the device asks again
                reply = refusal(ChunkRefused(error, "unavailable"), request)
            except OSError as exc:
                log.warning("reading a chunk of %s for %s failed: %s", request.file_name, device_name, exc)
                reply = refusal(ChunkRefused(OtadError("失败: the firmware file could not be read"), "unavailable"),
                                request)
            yield reply
        finally:
            self._slots.give(device_name)

    async def _read(self, device_name: str, request: ChunkRequest) -> ChunkReply:
        size, package_file = await self._stored(request.file_name)
        upgrade = await self._offered(device_name, package_file)
        if upgrade is _UNSET:
            raise ChunkRefused(Forbidden("没有权限: this file is not offered to this device"), "notOffered")
        if request.offset >= size:
            raise ChunkRefused(InvalidInput(f"参数无效: offset {request.offset} is past the end of the file "
                                            f"({size} bytes)"), "offsetPastEnd")
        count = min(request.size, size - request.offset)
        data = await self._read_range(request.file_name, request.offset, count)
        if upgrade is not None and upgrade.state in (UpgradeState.CREATED, UpgradeState.NOTIFIED):
            await self._reports.note_download(package_file, device_name)  # evidence, as an HTTP download
        info: dict[str, Any] = {"fileName": request.file_name, "offset": request.offset, "size": len(data),
                                "total": size}
        if request.request_id is not None:
            info["id"] = request.request_id
        return ChunkReply(_envelope(True, 200, "成功", info), data)

    async def _stored(self, file_name: str) -> tuple[int, str]:
        """(size, the package file it is or patches to) of a stored package or delta patch."""
        # Anything that is not a stored name is never looked up, nor turned into a path or a key.
        if STORED_NAME.fullmatch(file_name):
            package = await self._packages.find_by_file(file_name)
            if package is not None:
                return package.size, file_name
            patch = await self._deltas.find_by_file(file_name) if self._deltas is not None else None
            if patch is not None:
                return patch.size, patch.target_file_name
        raise ChunkRefused(NotFound("参数无效: no such firmware file"), "unknownFile")

    async def _offered(self, device_name: str, file_name: str):
        """The open upgrade that offers ``file_name`` (None when only the passive pin does);
        ``_UNSET`` when neither offers it."""
        upgrade = await self._upgrades.open_upgrade_of(device_name)
        if upgrade is not None and upgrade.file_name == file_name:
            return upgrade
        try:
            pin = await self._passive.for_device(device_name)
        except NotFound:
            return _UNSET
        return None if pin.package.file_name == file_name else _UNSET

    async def _read_range(self, file_name: str, offset: int, count: int) -> bytes:
        reading = await self._firmware.read(file_name, offset, count)
        if reading is None:
            raise ChunkRefused(NotFound("参数无效: no such firmware file"), "unknownFile")
        parts: list[bytes] = []
        try:
            async for part in reading:
                parts.append(part)
        finally:
            await reading.aclose()
        data = b"".join(parts)
        if len(data) != count:
            # The file is shorter than its package says: never hand a device a short chunk as whole.
            log.warning("firmware file %s: %d bytes at %d, expected %d", file_name, len(data), offset, count)
            raise ChunkRefused(OtadError("失败: the firmware file could not be read"), "unavailable")
        return data
