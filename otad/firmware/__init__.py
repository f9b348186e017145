"""Firmware stores behind one interface: a local directory (the default), a directory on a mount
several nodes share, and an S3-compatible bucket.

Files are named ``<uuid4><ext>``. A name is only ever turned into a path or an object key after it
matched ``STORED_NAME``, so no request can reach anything outside the store.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

STORED_NAME = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.[a-z0-9]{1,10}")

# How old a leftover on a shared store must be before a node sweeps it: younger, it may be another
# node's upload in progress (or one renamed into place whose row is being inserted right now).
SHARED_GRACE = 3600.0


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


class Reading(ABC):
    """The bytes of one stored file (or a range of them), streamed; closed by whoever opened it."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def aclose(self) -> None: ...


class FirmwareStore(ABC):
    """Where package files live. Every store streams uploads (hashing on the way) and never keeps
    a partial file under a stored name; the composition root picks one from ``firmware.url``."""

    @abstractmethod
    def describe(self) -> str:
        """Where the files are, for the log (no secret in it)."""

    @abstractmethod
    async def prepare(self) -> None:
        """Make the store ready at start and drop partial uploads a crash left behind."""

    @abstractmethod
    async def sweep_orphans(self, known: set[str]) -> None:
        """Remove stored files no package references (a crash between storing and recording)."""

    @abstractmethod
    async def receive(self, chunks: AsyncIterator[bytes], original_name: str | None, max_size: int) -> StoredFile:
        """Store ``chunks`` under a new name, hashing on the way. Raises MissingInput for an empty
        file and TooLarge past ``max_size``; on those and on any other failure nothing is left."""

    @abstractmethod
    async def discard(self, file_name: str) -> None:
        """Remove a stored file; a name that is not stored (or not a stored name) is no error."""

    @abstractmethod
    async def probe(self) -> None:
        """A small durable write where uploads go; raises StorageUnavailable (or StorageFull) if it fails."""

    def path_of(self, file_name: str) -> Path | None:
        """The file's path on this machine, for sendfile; None for a name that is not a stored
        name, and always None for a store that is not a file system."""
        return None

    @abstractmethod
    async def read(self, file_name: str, start: int, length: int) -> Reading | None:
        """``length`` bytes from ``start`` of a stored file, or None when there is no such file."""

    async def aclose(self) -> None:
        """Release connections (the S3 client); a directory has none."""


from otad.firmware.directory import DirectoryStore  # noqa: E402  (it implements the interface above)

__all__ = ["FirmwareStore", "DirectoryStore", "Reading", "StoredFile", "STORED_NAME", "SHARED_GRACE",
           "stored_extension"]
