"""The firmware file store: streamed writes with hashing, atomic rename, safe names.

Files are named ``<uuid4><ext>`` and live flat in one directory. A name is only ever turned into a
path after it matched ``STORED_NAME``, so no request can reach a file outside that directory.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import aiofiles
import aiofiles.os

from otad.errors import MissingInput, StorageFull, TooLarge

log = logging.getLogger(__name__)

STORED_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.[a-z0-9]{1,10}")
_TEMP_DIR = ".incoming"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class StoredFile:
    file_name: str
    size: int
    md5: str
    sha256: str


def stored_extension(original_name: str | None) -> str:
    """The original file's extension, lowercased and reduced to ``[a-z0-9]``; ``.bin`` if none is left."""
    # Browsers and curl on Windows may send a full path: keep only the last component of either kind.
    base = PureWindowsPath(PurePosixPath(original_name or "").name).name
    suffix = re.sub(r"[^a-z0-9]", "", PurePosixPath(base).suffix.lower())[:10]
    return f".{suffix}" if suffix else ".bin"


class FirmwareStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._incoming = directory / _TEMP_DIR

    def prepare(self) -> None:
        """Create the directories and drop partial uploads left by a crash."""
        self._incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self._incoming.iterdir():
            log.warning("removing partial upload left from an earlier run: %s", leftover.name)
            leftover.unlink(missing_ok=True)

    def sweep_orphans(self, known: set[str]) -> None:
        """Remove stored files that no package references (a crash between rename and insert)."""
        for entry in self.directory.iterdir():
            if entry.is_file() and STORED_NAME.fullmatch(entry.name) and entry.name not in known:
                log.warning("removing firmware file with no package: %s", entry.name)
                entry.unlink(missing_ok=True)

    def path_of(self, file_name: str) -> Path | None:
        """The path of a stored file, or None for any name that is not a stored name."""
        if not STORED_NAME.fullmatch(file_name):
            return None
        return self.directory / file_name

    async def receive(self, chunks: AsyncIterator[bytes], original_name: str | None, max_size: int) -> StoredFile:
        """Stream ``chunks`` to a temp file, hashing on the way, then rename it into place.

        Raises MissingInput for an empty file and TooLarge past ``max_size``; either way, and on any
        other failure, nothing is left on disk.
        """
        file_name = f"{uuid.uuid4()}{stored_extension(original_name)}"
        temp_path = self._incoming / f"{file_name}.part"
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
        return StoredFile(file_name=file_name, size=intake.size, md5=intake.md5.hexdigest(),
                          sha256=intake.sha256.hexdigest())

    async def probe(self) -> None:
        """A small durable write where uploads go; raises StorageFull when there is no room."""
        path = self._incoming / f".probe-{uuid.uuid4().hex}"

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
