"""Firmware files in a directory: this machine's (the default), or a mount several nodes share.

Uploads are streamed to ``.incoming`` with hashing on the way, flushed, then renamed into place,
so a stored name only ever holds a whole file. On a shared mount (``node`` set) each node names its
temp files after itself and sweeps another node's leftovers only once they are ``grace`` seconds
old: a younger one may be an upload in progress on that node.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiofiles
import aiofiles.os

from otad import firmware
from otad.errors import MissingInput, StartupError, StorageFull, TooLarge

log = logging.getLogger(__name__)

_TEMP_DIR = ".incoming"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_CHUNK = 256 * 1024


class DirectoryStore(firmware.FirmwareStore):
    def __init__(self, directory: Path, node: str | None = None, grace: float = firmware.SHARED_GRACE) -> None:
        """``node`` None: the directory is this daemon's alone (the data directory lock sees to
        it), so every leftover is stale. Set: a shared mount, ``node`` names this daemon there."""
        self.directory = directory
        self._incoming = directory / _TEMP_DIR
        self._node = node
        self._grace = grace if node is not None else 0.0
        self._prefix = f"{node}." if node is not None else ""

    def describe(self) -> str:
        kind = f"shared directory (node {self._node})" if self._node is not None else "directory"
        return f"{kind} {self.directory}"

    async def prepare(self) -> None:
        await asyncio.to_thread(self._prepare)

    def _prepare(self) -> None:
        if self._node is not None and not self.directory.is_dir():
            # Created here, it would be a local directory no other node sees: an unmounted share.
            raise StartupError(f"shared firmware directory {self.directory} does not exist (is it mounted?)")
        self._incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self._incoming.iterdir():
            # Our own temp files are from an earlier run of this node (it holds the data dir lock).
            if leftover.name.startswith(self._prefix) or self._is_old(leftover):
                log.warning("removing partial upload left from an earlier run: %s", leftover.name)
                leftover.unlink(missing_ok=True)

    def _is_old(self, path: Path) -> bool:
        try:
            return time.time() - path.stat().st_mtime >= self._grace
        except FileNotFoundError:
            return False  # its owner finished (or removed) it meanwhile

    async def sweep_orphans(self, known: set[str]) -> None:
        await asyncio.to_thread(self._sweep_orphans, known)

    def _sweep_orphans(self, known: set[str]) -> None:
        for entry in self.directory.iterdir():
            if (entry.is_file() and firmware.STORED_NAME.fullmatch(entry.name) and entry.name not in known
                    and self._is_old(entry)):
                log.warning("removing firmware file with no package: %s", entry.name)
                entry.unlink(missing_ok=True)

    def path_of(self, file_name: str) -> Path | None:
        if not firmware.STORED_NAME.fullmatch(file_name):
            return None
        return self.directory / file_name

    async def read(self, file_name: str, start: int, length: int) -> firmware.Reading | None:
        path = self.path_of(file_name)
        if path is None:
            return None
        try:
            handle = await aiofiles.open(path, "rb")
        except FileNotFoundError:
            return None
        await handle.seek(start)
        return _FileReading(handle, length)

    async def receive(self, chunks: AsyncIterator[bytes], original_name: str | None, max_size: int) -> firmware.StoredFile:
        """Stream ``chunks`` to a temp file, hashing on the way, then rename it into place."""
        file_name = f"{uuid.uuid4()}{firmware.stored_extension(original_name)}"
        temp_path = self._incoming / f"{self._prefix}{file_name}.part"
        try:
            async with aiofiles.open(temp_path, "wb") as out:
                intake = _Intake(out)
                try:
                    async for chunk in chunks:
                        if intake.size + len(chunk) > max_size:
                            raise TooLarge(f"文件过大: the upload exceeds the limit of {max_size} bytes")
                        await intake.absorb(chunk)
                    if intake.size == 0:
                        raise MissingInput("参数缺失: the uploaded file is empty")
                    await intake.finish()
                finally:
                    await intake.settle()
            await aiofiles.os.replace(temp_path, self.directory / file_name)
        except BaseException as exc:
            await asyncio.shield(asyncio.to_thread(temp_path.unlink, missing_ok=True))
            if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
                raise StorageFull("firmware store: no space left on the device") from None
            raise
        return firmware.StoredFile(file_name=file_name, size=intake.size, md5=intake.md5.hexdigest(),
                                   sha256=intake.sha256.hexdigest())

    async def probe(self) -> None:
        """A small durable write where uploads go; raises StorageFull when there is no room."""
        path = self._incoming / f"{self._prefix}.probe-{uuid.uuid4().hex}"

        def write() -> None:
            try:
                with open(path, "wb") as out:
                    out.write(b"\0" * 4096)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                if exc.errno in _NO_SPACE:
                    raise StorageFull("firmware store: no space left on the device") from None
                raise
            finally:
                path.unlink(missing_ok=True)

        await asyncio.to_thread(write)

    async def discard(self, file_name: str) -> None:
        path = self.path_of(file_name)
        if path is not None:
            await asyncio.to_thread(path.unlink, missing_ok=True)


class _FileReading(firmware.Reading):
    def __init__(self, handle, length: int) -> None:
        self._handle, self._left = handle, length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self._left > 0 and (chunk := await self._handle.read(min(_READ_CHUNK, self._left))):
            self._left -= len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._handle.close()


class _Intake:
    """One upload on its way to disk, as a pipeline: while a chunk is hashed (md5 and sha256 each in
    a thread; hashlib releases the GIL, and md5 alone is ~800 MB/s here) and written, the next one is
    read from the network; and the file is flushed to disk every 64 MiB in the background, so the
    final fsync does not have to write a whole gigabyte at once."""

    SYNC_EVERY = 64 * 1024 * 1024

    def __init__(self, out) -> None:
        self.out = out
        self.md5, self.sha256, self.size = hashlib.md5(), hashlib.sha256(), 0
        self._absorbing: asyncio.Future | None = None
        self._syncing: asyncio.Future | None = None
        self._unsynced = 0

    async def absorb(self, chunk: bytes) -> None:
        if self._absorbing is not None:
            await self._absorbing
        self.size += len(chunk)
        self._absorbing = asyncio.gather(asyncio.to_thread(self.md5.update, chunk),
                                         asyncio.to_thread(self.sha256.update, chunk), self.out.write(chunk))
        self._unsynced += len(chunk)
        if self._syncing is not None and self._syncing.done():
            syncing, self._syncing = self._syncing, None
            syncing.result()  # a writeback error is reported once: it must fail this upload
        if self._unsynced >= self.SYNC_EVERY and self._syncing is None:
            await self._absorbing  # what is synced must have been written
            self._absorbing = None
            await self.out.flush()
            self._syncing = asyncio.ensure_future(asyncio.to_thread(os.fdatasync, self.out.fileno()))
            self._unsynced = 0

    async def finish(self) -> None:
        """Everything written and on disk."""
        await self.settle()
        await self.out.flush()
        await asyncio.to_thread(os.fsync, self.out.fileno())

    async def settle(self) -> None:
        """Wait for the work in flight, success or not (before the file is closed or removed)."""
        pending = [f for f in (self._absorbing, self._syncing) if f is not None]
        self._absorbing = self._syncing = None
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
