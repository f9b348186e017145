"""The upload intake pipeline: exact hashes, nothing left behind, disk errors not swallowed.

The only double is the operating system's fdatasync (an edge otad does not own), made to fail."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os

import pytest

from otad.errors import TooLarge
from otad.firmware import DirectoryStore, directory


async def _chunks(chunks, fail_at=None):
    for index, chunk in enumerate(chunks):
        if index == fail_at:
            raise ConnectionResetError("client went away")
        await asyncio.sleep(0)
        yield chunk


def _files(store: DirectoryStore) -> list[str]:
    return sorted(path.name for path in store.directory.rglob("*") if path.is_file())


@pytest.fixture
async def store(tmp_path, monkeypatch):
    monkeypatch.setattr(directory._Intake, "SYNC_EVERY", 1000)  # many background syncs on small data
    store = DirectoryStore(tmp_path)
    await store.prepare()
    return store


async def test_hashes_and_bytes_are_exact_across_odd_chunks(store):
    chunks = [os.urandom(size) for size in (1, 999, 4096, 7, 65536, 3)] * 20
    stored = await store.receive(_chunks(chunks), "a.bin", 10**9)
    data = b"".join(chunks)
    assert (stored.size, stored.md5, stored.sha256) == (len(data), hashlib.md5(data).hexdigest(),
                                                        hashlib.sha256(data).hexdigest())
    assert (store.directory / stored.file_name).read_bytes() == data


async def test_too_large_a_vanished_client_and_cancellation_leave_nothing(store):
    with pytest.raises(TooLarge):
        await store.receive(_chunks([b"x" * 600] * 10), "a.bin", 3000)
    with pytest.raises(ConnectionResetError):
        await store.receive(_chunks([b"x" * 600] * 10, fail_at=5), "a.bin", 10**9)
    task = asyncio.ensure_future(store.receive(_chunks([b"x" * 600] * 10000), "a.bin", 10**9))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert _files(store) == []


async def test_a_failed_background_sync_fails_the_upload(store, monkeypatch):
    """Linux reports a writeback error once: swallowed, the final fsync would succeed on lost data."""
    real = os.fdatasync
    calls = []

    def failing_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", failing_once)
    with pytest.raises(OSError, match="Input/output"):
        await store.receive(_chunks([b"y" * 600] * 40), "a.bin", 10**9)
    await asyncio.sleep(0.1)
    assert _files(store) == []
