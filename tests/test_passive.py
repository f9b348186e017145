"""Passive OTA: pin a package for a device, the device polls otaPassiveEnable and downloads."""

from __future__ import annotations

import hashlib

from tests.helpers import ENVELOPE_KEYS, assert_error

FIRMWARE = b"passive firmware " * 1000


async def _setup(otad):
    await otad.add_device("dev1", 4)
    _, body = await otad.upload("fw-1.8", 4, FIRMWARE)
    return body["data"]


async def _pin(otad, **fields):
    body = {"deviceName": "dev1", "name": "fw-1.8", "description": "fixes", "versionName": "1.8", **fields}
    return await otad.request("POST", "/api/v2/otaPassive", json=body)


async def _poll(otad, device: str = "dev1"):
    return await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False, params={"deviceName": device})


async def test_pin_then_poll_answers_exactly_as_the_seed(otad):
    package = await _setup(otad)
    status, body = await _pin(otad)
    assert status == 200
    device_id = (await otad.request("GET", "/api/v2/devices"))[1]["data"][0]["id"]
    assert body["data"] == {"id": body["data"]["id"], "otaId": package["id"], "deviceId": device_id,
                            "versionName": "1.8", "description": "fixes"}

    status, body = await _poll(otad)
    assert status == 200
    assert list(body) == ENVELOPE_KEYS
    assert (body["success"], body["errorCode"], body["errorMsg"]) == (True, 200, "成功")
    data = body["data"]
    assert list(data)[:4] == ["fileName", "version", "md5", "description"]
    assert data == {"fileName": package["fileName"], "version": "1.8", "md5": hashlib.md5(FIRMWARE).hexdigest(),
                    "description": "fixes", "sha256": hashlib.sha256(FIRMWARE).hexdigest(), "size": len(FIRMWARE),
                    "url": f"{otad.url}/api/v2/micro/{package['fileName']}"}
    async with otad.session.get(data["url"]) as response:
        assert response.status == 200 and await response.read() == FIRMWARE


async def test_repin_replaces_and_description_may_be_missing(otad):
    await _setup(otad)
    _, first = await _pin(otad)
    await otad.upload("fw-1.9", 4, b"newer")
    status, second = await _pin(otad, name="fw-1.9", versionName="1.9", description=None)
    assert status == 200 and second["data"]["description"] is None
    _, body = await _poll(otad)
    assert body["data"]["version"] == "1.9" and body["data"]["description"] is None
    _, listed = await otad.request("GET", "/api/v2/otaPassive")
    assert [(p["deviceName"], p["otaName"], p["versionName"]) for p in listed["data"]] == [("dev1", "fw-1.9", "1.9")]
    assert otad.db_rows("passive_pin") == 1


async def test_poll_for_unknown_device_or_no_pin_is_1001(otad):
    status, body = await _poll(otad, "ghost")
    assert_error(status, body, 404, 1001)
    await _setup(otad)
    status, body = await _poll(otad)
    assert_error(status, body, 404, 1001)


async def test_pin_needs_a_version_name_and_an_existing_package(otad):
    await _setup(otad)
    status, body = await _pin(otad, versionName="")
    assert_error(status, body, 400, 1004)
    status, body = await _pin(otad, name="no-such-package")
    assert_error(status, body, 404, 1001)
    status, body = await _pin(otad, deviceName="ghost")
    assert_error(status, body, 404, 1001)
    assert otad.db_rows("passive_pin") == 0


async def test_list_is_empty_list_and_delete_works(otad):
    status, body = await otad.request("GET", "/api/v2/otaPassive")
    assert status == 200 and body["data"] == []
    await _setup(otad)
    _, pinned = await _pin(otad)
    status, _ = await otad.request("DELETE", "/api/v2/otaPassive", params={"id": str(pinned["data"]["id"])})
    assert status == 200
    status, body = await _poll(otad)
    assert_error(status, body, 404, 1001)
    status, body = await otad.request("DELETE", "/api/v2/otaPassive", params={"id": str(pinned["data"]["id"])})
    assert_error(status, body, 404, 1001)


async def test_deleting_a_pinned_package_is_refused_with_3002(otad):
    package = await _setup(otad)
    await _pin(otad)
    status, body = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(package["id"])})
    assert_error(status, body, 409, 3002)
    assert otad.firmware_files() == [package["fileName"]] and otad.db_rows("package") == 1
    _, body = await _poll(otad)
    assert body["success"] is True


async def test_public_url_is_used_for_the_download_url(tmp_path):
    from tests.conftest import make_settings, start_otad

    instance = await start_otad(make_settings(tmp_path / "d", public_url="https://ota.example.com/"))
    try:
        package = await _setup(instance)
        await _pin(instance)
        _, body = await _poll(instance)
        assert body["data"]["url"] == f"https://ota.example.com/api/v2/micro/{package['fileName']}"
    finally:
        await instance.stop()


async def test_a_cached_poll_is_dropped_when_the_device_is_deleted(otad):
    await _setup(otad)
    await _pin(otad)
    status, _ = await _poll(otad)
    assert status == 200  # now cached
    await otad.request("DELETE", "/api/v2/devices", params={"deviceName": "dev1"})
    status, body = await _poll(otad)
    assert_error(status, body, 404, 1001)
