"""Shared firmware stores with real daemons: an S3 bucket on a real S3 server (SeaweedFS) and a
directory two daemons share (firmware.url = file://...).

What an operator checks: the object is in the bucket under the prefix, a range comes back as 206
with the right bytes from either node, both nodes answer the same ETag (so If-Range holds across
them), a deleted package's object is gone, a refused upload leaves nothing in the bucket; on a
shared mount a starting node does not sweep another node's upload in progress.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time

import pytest

from otad.composition import node_name
from otad.errors import StartupError
from tests.conftest import make_settings, running_otad, sqlite_only, start_otad
from tests.s3 import s3_server  # noqa: F401  (the fixture)

MIB = 1024 * 1024
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def bucket(s3_server, monkeypatch):  # noqa: F811
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return s3_server.new_bucket()


def _copy_database(source, target) -> None:
    """The first node's rows for the second (the same data; on PostgreSQL they would share it),
    less its API tokens: the second node's test client makes its own."""
    target.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(source / "otad.sqlite3") as src, sqlite3.connect(target / "otad.sqlite3") as dst:
        src.backup(dst)
        dst.execute('DELETE FROM "api_token"')


async def _get(otad, file_name: str, headers=None):
    async with otad.session.get(f"{otad.url}/api/v2/micro/{file_name}", headers=headers or {}) as response:
        return response.status, response.headers.copy(), await response.read()


@sqlite_only("copies the first node's SQLite file for the second")
async def test_s3_upload_range_etag_across_two_nodes_and_delete(tmp_path, s3_server, bucket):  # noqa: F811
    url = f"s3://{bucket}/otad/firmware"
    data = os.urandom(20 * MIB + 12345)  # three parts of a multipart upload
    small = os.urandom(3000)  # one PUT
    settings_a = make_settings(tmp_path / "a", **{"firmware.url": url})
    async with running_otad(settings_a) as node_a:
        status, body = await node_a.upload("big", 1, data, filename="big.bin")
        assert status == 200, body
        package = body["data"]
        assert (package["size"], package["sha256"], package["md5"]) == (
            len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())
        status, body = await node_a.upload("small", 1, small, filename="small.img")
        assert status == 200, body
        small_file = body["data"]["fileName"]
        assert s3_server.keys(bucket) == sorted([f"otad/firmware/{package['fileName']}", f"otad/firmware/{small_file}"])
        assert node_a.firmware_files() == []  # nothing on local disk
        async with node_a.session.get(f"{node_a.url}/healthz") as response:
            assert response.status == 200

        _copy_database(tmp_path / "a", tmp_path / "b")
        async with running_otad(make_settings(tmp_path / "b", **{"firmware.url": url})) as node_b:
            await _two_nodes_serve_alike(s3_server, bucket, node_a, node_b, package, data, small, small_file)


async def _two_nodes_serve_alike(s3_server, bucket, node_a, node_b, package, data, small, small_file):  # noqa: F811
    """Either node: the same bytes, ranges and ETag; a delete on one removes the object."""
    file_name = package["fileName"]
    status, headers_a, whole = await _get(node_a, file_name)
    assert status == 200 and whole == data and headers_a["Content-Length"] == str(len(data))
    etag = headers_a["ETag"]
    assert etag == f'"{package["sha256"]}"'

    # Across the boundary of the first two parts, asked of the other node with A's ETag.
    first, last = 8 * MIB - 10, 8 * MIB + 9
    status, headers_b, part = await _get(node_b, file_name, {"Range": f"bytes={first}-{last}", "If-Range": etag})
    assert status == 206 and part == data[first:last + 1]
    assert headers_b["ETag"] == etag
    assert headers_b["Content-Range"] == f"bytes {first}-{last}/{len(data)}"
    status, _, tail = await _get(node_b, file_name, {"Range": "bytes=-100"})
    assert status == 206 and tail == data[-100:]
    status, _, body = await _get(node_b, file_name, {"Range": "bytes=100-", "If-Range": '"another"'})
    assert status == 200 and body == data  # a stale validator gets the whole file
    status, headers, _ = await _get(node_b, file_name, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    status, _, _ = await _get(node_b, file_name, {"If-None-Match": etag})
    assert status == 304
    async with node_b.session.head(f"{node_b.url}/api/v2/micro/{file_name}") as response:
        assert response.status == 200 and response.headers["Content-Length"] == str(len(data))
    status, _, body = await _get(node_b, small_file)
    assert status == 200 and body == small

    status, body = await node_a.request("DELETE", "/api/v2/otaDelete", params={"id": str(package["id"])})
    assert status == 200, body
    assert s3_server.keys(bucket) == [f"otad/firmware/{small_file}"]


async def test_s3_refused_upload_leaves_no_object_and_no_parts(tmp_path, s3_server, bucket):  # noqa: F811
    settings = make_settings(tmp_path / "a", **{"firmware.url": f"s3://{bucket}/fw", "http.max_upload_size": 10 * MIB})
    async with running_otad(settings) as node:
        status, body = await node.upload("big", 1, os.urandom(12 * MIB))  # one part went up before the limit
        assert status == 413, body
        status, body = await node.upload("empty", 1, b"")
        assert status == 400, body
    assert s3_server.keys(bucket) == []

    async with s3_server.client() as s3:
        uploads = await s3.list_multipart_uploads(Bucket=bucket)
    assert uploads.get("Uploads", []) == []


async def test_s3_unreachable_bucket_stops_the_start(tmp_path, s3_server, monkeypatch):  # noqa: F811
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StartupError, match="no-such-bucket"):
        await start_otad(make_settings(tmp_path / "a", **{"firmware.url": "s3://no-such-bucket/fw"}))


def _age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_shared_mount_sweep_keeps_another_nodes_fresh_upload(tmp_path):
    shared = tmp_path / "shared"
    url = f"file://{shared}"
    with pytest.raises(StartupError, match="is it mounted"):
        await start_otad(make_settings(tmp_path / "a", **{"firmware.url": url}))
    shared.mkdir()
    settings_a = make_settings(tmp_path / "a", **{"firmware.url": url})
    settings_b = make_settings(tmp_path / "b", **{"firmware.url": url})
    content = os.urandom(50_000)
    async with running_otad(settings_a) as node_a:
        status, body = await node_a.upload("fw", 1, content)
        assert status == 200, body
        stored = body["data"]["fileName"]
        incoming = shared / ".incoming"
        # Node A mid-upload: its temp file, named after it, young.
        in_progress = incoming / f"{node_name(settings_a)}.0b5c3d6e-1111-4222-8333-444455556666.bin.part"
        in_progress.write_bytes(b"partial")
        # A crash long ago, of a node that is gone: old leftovers, a temp file and a stored file with no package.
        old_temp = incoming / "gone-node-1234abcd.9a8b7c6d-1111-4222-8333-444455556666.bin.part"
        old_temp.write_bytes(b"stale")
        _age(old_temp, 2 * 3600)
        old_orphan = shared / "9a8b7c6d-2222-4222-8333-444455556666.bin"
        old_orphan.write_bytes(b"orphan")
        _age(old_orphan, 2 * 3600)
        # Renamed into place by A a moment ago, its row not yet written: young, so kept too.
        fresh_orphan = shared / "0b5c3d6e-3333-4222-8333-444455556666.bin"
        fresh_orphan.write_bytes(b"just stored")

        async with running_otad(settings_b) as node_b:  # its sweep knows none of A's packages
            assert in_progress.exists() and fresh_orphan.exists() and (shared / stored).exists()
            assert not old_temp.exists() and not old_orphan.exists()
            status, _, body = await _get(node_a, stored, {"Range": "bytes=10-19"})
            assert status == 206 and body == content[10:20]
            status, headers, body = await _get(node_a, stored)
            assert headers["ETag"] == f'"{hashlib.sha256(content).hexdigest()}"'

        # A restart of node A: its own temp files are from its earlier run, whatever their age.
        await node_a.restart()
        assert not in_progress.exists()
        assert (shared / stored).exists() and fresh_orphan.exists()


async def test_s3_health_probe_writes_and_names_a_missing_bucket(s3_server, bucket):  # noqa: F811
    from otad.errors import StorageUnavailable
    from otad.firmware.s3 import S3Store

    store = S3Store(f"s3://{bucket}/fw")
    try:
        await store.probe()  # a small object written and removed
        assert s3_server.keys(bucket) == []
    finally:
        await store.aclose()
    gone = S3Store("s3://no-such-bucket/fw")
    try:
        with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
            await gone.probe()
    finally:
        await gone.aclose()
