"""The seed's push flow end to end: upload, enable, the device is told on MQTT, it downloads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re

from tests.conftest import db_query

FIRMWARE = os.urandom(300_000)


async def test_seed_push_flow_delivers_exact_payload_and_file(otad):
    password = await otad.add_device("dev1", 7)
    device = otad.device("dev1", password)
    assert await device.connect() == 0
    assert await device.subscribe("/oc/devices/dev1/sys/ota") == [1]

    status, body = await otad.upload("serialTest", 7, FIRMWARE, filename="app.BIN")
    assert status == 200 and body["success"] is True and body["errorCode"] == 200 and body["errorMsg"] == "成功"
    package = body["data"]
    assert package["md5"] == hashlib.md5(FIRMWARE).hexdigest()
    assert package["sha256"] == hashlib.sha256(FIRMWARE).hexdigest()
    assert package["size"] == len(FIRMWARE) and package["productId"] == 7 and package["name"] == "serialTest"
    assert re.fullmatch(r"[0-9a-f-]{36}\.bin", package["fileName"])
    assert {"id", "createdAt"} <= package.keys()

    status, body = await otad.enable("serialTest", "dev1")
    assert status == 200 and body["success"] is True
    [row] = body["data"]
    assert row["id"] == package["id"] and row["name"] == "serialTest" and row["productId"] == 7

    message = await device.next_message()
    assert message.topic == "/oc/devices/dev1/sys/ota"
    assert message.qos == 1
    expected = f'{{"fileName":"{package["fileName"]}","version":"{row["version"]}","md5":"{package["md5"]}"}}'
    assert message.payload.decode() == expected  # compact, keys in the contract's order
    command = json.loads(message.payload)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", command["version"])

    async with otad.session.get(f"{otad.url}/api/v2/micro/{command['fileName']}") as response:
        assert response.status == 200
        data = await response.read()
        assert int(response.headers["Content-Length"]) == len(FIRMWARE)
        assert "chunked" not in response.headers.get("Transfer-Encoding", "")
        assert 'filename="app.BIN"' in response.headers["Content-Disposition"]
        assert response.headers["ETag"]
    assert hashlib.md5(data).hexdigest() == command["md5"]
    await device.close()


async def test_each_enable_has_a_fresh_version_and_is_recorded(otad):
    await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"firmware")
    versions = set()
    for _ in range(3):
        status, body = await otad.enable("fw", "dev1")
        assert status == 200
        versions.add(body["data"][0]["version"])
    assert len(versions) == 3
    assert otad.db_rows("upgrade") == 3


async def test_interrupted_download_resumes_with_range(otad):
    _, body = await otad.upload("fw", 1, FIRMWARE)
    url = f"{otad.url}/api/v2/micro/{body['data']['fileName']}"
    async with otad.session.get(url, headers={"Range": "bytes=0-99999"}) as response:
        assert response.status == 206
        first = await response.read()
        etag = response.headers["ETag"]
    async with otad.session.get(url, headers={"Range": "bytes=100000-", "If-Range": etag}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 100000-{len(FIRMWARE) - 1}/{len(FIRMWARE)}"
        rest = await response.read()
    assert first + rest == FIRMWARE


async def test_if_range_with_another_etag_sends_the_whole_file(otad):
    _, body = await otad.upload("fw", 1, FIRMWARE)
    url = f"{otad.url}/api/v2/micro/{body['data']['fileName']}"
    for validator in ('"stale-etag"', 'W/"weak"', "not a date"):
        async with otad.session.get(url, headers={"Range": "bytes=100-", "If-Range": validator}) as response:
            assert response.status == 200, validator
            assert await response.read() == FIRMWARE


async def test_head_gives_length_without_body(otad):
    _, body = await otad.upload("fw", 1, FIRMWARE)
    async with otad.session.head(f"{otad.url}/api/v2/micro/{body['data']['fileName']}") as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(FIRMWARE)
        assert await response.read() == b""


async def test_download_refuses_unknown_and_escaping_names(otad, tmp_path):
    (tmp_path / "secret.txt").write_text("do not serve")
    _, body = await otad.upload("fw", 1, b"firmware")
    known = body["data"]["fileName"]
    for name in ("00000000-0000-4000-8000-000000000000.bin", "..%2F..%2Fsecret.txt", "%2E%2E%2Fotad.sqlite3",
                 "..", "otad.sqlite3", "%2Fetc%2Fpasswd", known.upper(), known + ".gz"):
        async with otad.session.get(f"{otad.url}/api/v2/micro/{name}") as response:
            assert response.status == 404, name
            assert b"do not serve" not in await response.read()
    async with otad.session.get(f"{otad.url}/api/v2/micro/../../secret.txt") as response:
        assert response.status == 404


async def test_list_and_delete_package_removes_file(otad):
    _, body = await otad.upload("fw", 3, b"one")
    package = body["data"]
    status, body = await otad.request("GET", "/api/v2/otaList")
    assert status == 200 and [p["id"] for p in body["data"]] == [package["id"]]
    assert otad.firmware_files() == [package["fileName"]]

    status, body = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(package["id"])})
    assert status == 200 and body["success"] is True
    assert otad.firmware_files() == []
    status, body = await otad.request("GET", "/api/v2/otaList")
    assert body["data"] == []
    async with otad.session.get(f"{otad.url}/api/v2/micro/{package['fileName']}") as response:
        assert response.status == 404


async def test_deleting_a_package_withdraws_its_pending_command(otad):
    password = await otad.add_device("dev1", 1)
    _, body = await otad.upload("fw", 1, b"one")
    await otad.enable("fw", "dev1")
    await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(body["data"]["id"])})
    device = otad.device("dev1", password)
    assert await device.connect() == 0
    await device.subscribe("/oc/devices/dev1/sys/ota")
    assert await device.no_message(within=1.0)
    await device.close()


async def test_concurrent_enables_leave_exactly_one_open_upgrade(otad):
    await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"firmware")
    results = await asyncio.gather(*(otad.enable("fw", "dev1") for _ in range(20)))
    assert all(status == 200 for status, _ in results)
    states = dict(db_query(otad.settings, "SELECT state, COUNT(*) FROM upgrade GROUP BY state"))
    assert states == {"notified": 1, "superseded": 19}
