"""xiaozhi-esp32 boards: a real board's check replayed against per-product pins (boards activate
first; the activation flow itself is in test_xiaozhi_activation.py)."""

from __future__ import annotations

import time
import uuid

import pytest

from tests.conftest import make_settings, start_otad
from tests.helpers import assert_error

MAC = "aa:bb:cc:dd:ee:ff"
FIRMWARE = b"\xe9" + b"xiaozhi image " * 5000


def client_of(mac: str) -> str:
    """A board's Client-Id: a UUID it keeps in flash, so the same on every check."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, mac))


def board_headers(mac: str = MAC, version: str = "1.9.2", client_id: str | None = None) -> dict[str, str]:
    return {"Activation-Version": "2", "Device-Id": mac, "Client-Id": client_id or client_of(mac),
            "User-Agent": f"bread-compact-wifi/{version}", "Accept-Language": "zh-CN",
            "Content-Type": "application/json"}


def board_body(mac: str = MAC, version: str = "1.9.2") -> dict:
    """As the firmware sends it: note version is an int and minimum_free_heap_size a string."""
    return {
        "version": 2, "language": "zh-CN", "flash_size": 16777216, "minimum_free_heap_size": "123456",
        "mac_address": mac, "uuid": str(uuid.uuid4()), "chip_model_name": "esp32s3",
        "chip_info": {"model": 9, "cores": 2, "revision": 2, "features": 18},
        "application": {"name": "xiaozhi", "version": version, "compile_time": "Jun  1 2025T10:00:00Z",
                        "idf_version": "v5.4", "elf_sha256": "ab" * 32},
        "partition_table": [{"label": "nvs", "type": 1, "subtype": 2, "address": 36864, "size": 16384}],
        "ota": {"label": "ota_0"}, "display": {},
        "board": {"type": "bread-compact-wifi", "name": "bread-compact-wifi", "ssid": "lab", "rssi": -50,
                  "channel": 6, "ip": "192.168.1.20", "mac": mac},
    }


async def check(otad, mac: str = MAC, version: str = "1.9.2", path: str = "/xiaozhi/ota/",
                client_id: str | None = None):
    async with otad.session.post(otad.url + path, json=board_body(mac, version),
                                 headers=board_headers(mac, version, client_id)) as response:
        return response.status, await response.json()


async def activate_board(otad, mac: str = MAC, client_id: str | None = None) -> dict:
    """The board checks, is shown a code, and the operator accepts that code over the API."""
    status, reply = await check(otad, mac, client_id=client_id)
    assert status == 200 and "activation" in reply, reply
    status, body = await otad.request("POST", "/api/v2/xiaozhi/activate", json={"code": reply["activation"]["code"]})
    assert status == 200, body
    return body["data"]


async def _product_with_package(otad, product_id: int = 9) -> dict:
    await otad.add_device(MAC, product_id)
    await activate_board(otad)
    _, body = await otad.upload("xiaozhi-1.9.3", product_id, FIRMWARE)
    return body["data"]


async def _pin(otad, package: dict, version: str = "1.9.3", **extra):
    return await otad.request("POST", "/api/v2/xiaozhi/otaPassive",
                              json={"otaId": package["id"], "productId": package["productId"],
                                    "versionName": version, **extra})


async def test_newer_pin_is_offered_with_a_url_that_downloads_the_file(otad):
    package = await _product_with_package(otad)
    status, body = await _pin(otad, package)
    assert status == 200
    assert body["data"] == {"id": body["data"]["id"], "otaId": package["id"], "productId": 9,
                            "versionName": "1.9.3", "force": False}

    before = int(time.time() * 1000)
    status, reply = await check(otad)
    assert status == 200
    assert set(reply) == {"server_time", "firmware"}  # no websocket/mqtt unless configured
    assert set(reply["server_time"]) == {"timestamp", "timezone_offset"}
    assert before - 1000 <= reply["server_time"]["timestamp"] <= int(time.time() * 1000) + 1000
    assert isinstance(reply["server_time"]["timezone_offset"], int)
    assert reply["firmware"] == {"version": "1.9.3", "url": f"{otad.url}/api/v2/micro/{package['fileName']}"}

    async with otad.session.get(reply["firmware"]["url"]) as response:  # as the board: a plain GET
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(FIRMWARE) > 0
        assert await response.read() == FIRMWARE


@pytest.mark.parametrize("board_version", ["1.9.3", "1.9.10", "2.0", "1.9.3.1"])
async def test_same_or_newer_board_is_not_offered(otad, board_version):
    package = await _product_with_package(otad)
    await _pin(otad, package, "1.9.3")
    status, reply = await check(otad, version=board_version)
    assert status == 200
    assert reply["firmware"] == {"version": board_version, "url": ""}


async def test_numeric_not_lexical_comparison(otad):
    package = await _product_with_package(otad)
    await _pin(otad, package, "1.10.0")
    _, reply = await check(otad, version="1.9.9")
    assert reply["firmware"]["version"] == "1.10.0" and reply["firmware"]["url"]


async def test_force_offers_even_an_older_version(otad):
    package = await _product_with_package(otad)
    await _pin(otad, package, "1.0.0", force=True)
    _, reply = await check(otad, version="1.9.2")
    assert reply["firmware"]["version"] == "1.0.0"
    assert reply["firmware"]["force"] == 1 and reply["firmware"]["url"].endswith(package["fileName"])


async def test_check_records_the_boards_inventory(otad):
    await _product_with_package(otad)
    await check(otad)
    _, body = await otad.request("GET", "/api/v2/devices")
    [board] = body["data"]
    assert board["deviceName"] == MAC
    assert (board["appVersion"], board["boardType"], board["boardName"], board["chip"], board["elfSha256"],
            board["remoteAddr"]) == ("1.9.2", "bread-compact-wifi", "bread-compact-wifi", "esp32s3", "ab" * 32,
                                     "127.0.0.1")
    assert board["lastCheckAt"]


async def test_unknown_board_without_default_product_gets_no_upgrade(otad):
    status, reply = await check(otad, mac="11:22:33:44:55:66")
    assert status == 200 and reply["firmware"] == {"version": "1.9.2", "url": ""}
    assert "activation" not in reply  # boards are not enrolled here: nothing to activate into
    assert otad.db_rows("device") == 0 and otad.db_rows("xiaozhi_activation") == 0


async def test_unknown_board_joins_the_default_product_once_activated(tmp_path):
    instance = await start_otad(make_settings(tmp_path / "d", **{"xiaozhi.default_product_id": "9"}))
    try:
        _, body = await instance.upload("xiaozhi-1.9.3", 9, FIRMWARE)
        await _pin(instance, body["data"])
        status, reply = await check(instance, mac="11:22:33:44:55:66", path="/xiaozhi/ota")
        assert status == 200 and reply["firmware"] == {"version": "1.9.2", "url": ""} and reply["activation"]
        assert instance.db_rows("device") == 0
        await activate_board(instance, mac="11:22:33:44:55:66")
        status, reply = await check(instance, mac="11:22:33:44:55:66", path="/xiaozhi/ota")
        assert status == 200 and reply["firmware"]["version"] == "1.9.3" and "activation" not in reply
        _, devices = await instance.request("GET", "/api/v2/devices")
        assert [(d["deviceName"], d["productId"], d["appVersion"]) for d in devices["data"]] == [
            ("11:22:33:44:55:66", 9, "1.9.2")]
    finally:
        await instance.stop()


async def test_websocket_and_mqtt_sections_only_when_configured(tmp_path):
    websocket = {"url": "wss://voice.example/xiaozhi/v1/", "token": "t0k"}
    mqtt = {"endpoint": "mqtt.example", "client_id": "c", "username": "u", "password": "p",
            "publish_topic": "device-server", "subscribe_topic": "null", "keepalive": 240}
    instance = await start_otad(make_settings(tmp_path / "d", **{
        "xiaozhi.websocket": websocket, "xiaozhi.mqtt": mqtt, "xiaozhi.timezone_offset": "480"}))
    try:
        _, reply = await check(instance)
        assert reply["websocket"] == websocket and reply["mqtt"] == mqtt
        assert reply["server_time"]["timezone_offset"] == 480
    finally:
        await instance.stop()


async def test_bad_board_requests_are_400_json(otad):
    url = otad.url + "/xiaozhi/ota/"
    for headers, data in (({"Client-Id": "c"}, b"{}"), ({"Device-Id": MAC}, b"{}"),
                          ({"Device-Id": MAC, "Client-Id": "c"}, b"not json"),
                          ({"Device-Id": MAC, "Client-Id": "c"}, b"[1, 2]"),
                          ({"Device-Id": "a/b", "Client-Id": "c"}, b"{}")):
        async with otad.session.post(url, data=data, headers=headers) as response:
            assert response.status == 400
            body = await response.json()
            assert body["success"] is False and body["errorMsg"]
    status, reply = await check(otad)  # the daemon keeps serving boards
    assert status == 200


async def test_get_says_the_endpoint_is_up(otad):
    async with otad.session.get(otad.url + "/xiaozhi/ota/") as response:
        assert response.status == 200 and "up" in await response.text()


async def test_pin_validation(otad):
    package = await _product_with_package(otad)
    for version in ("1.9.3-beta", "v1.9", "", 1.9, "1..2"):
        status, body = await _pin(otad, package, version)
        assert status == 400 and body["success"] is False, version
        assert body["errorCode"] in (1001, 1004)
    status, body = await _pin(otad, package, "not dotted")
    assert_error(status, body, 400, 1001)
    assert "dotted integers" in body["errorMsg"]
    status, body = await otad.request("POST", "/api/v2/xiaozhi/otaPassive",
                                      json={"otaId": package["id"], "productId": 10, "versionName": "1.9.3"})
    assert_error(status, body, 400, 1001)  # the package belongs to product 9
    assert otad.db_rows("xiaozhi_pin") == 0


async def test_one_pin_per_product_list_delete_and_package_protection(otad):
    package = await _product_with_package(otad)
    await _pin(otad, package, "1.9.3")
    _, second = await _pin(otad, package, "1.9.4")
    _, listed = await otad.request("GET", "/api/v2/xiaozhi/otaPassive")
    assert [(p["otaId"], p["otaName"], p["productId"], p["versionName"]) for p in listed["data"]] == [
        (package["id"], "xiaozhi-1.9.3", 9, "1.9.4")]
    assert {"id", "productName"} <= listed["data"][0].keys()

    status, body = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(package["id"])})
    assert_error(status, body, 409, 3002)
    status, _ = await otad.request("DELETE", "/api/v2/xiaozhi/otaPassive", params={"id": str(second["data"]["id"])})
    assert status == 200
    _, reply = await check(otad)
    assert reply["firmware"] == {"version": "1.9.2", "url": ""}
    status, _ = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(package["id"])})
    assert status == 200


async def test_full_width_digits_are_not_a_version(otad):
    package = await _product_with_package(otad)
    status, body = await _pin(otad, package, "１.2.3")
    assert_error(status, body, 400, 1001)


async def test_a_board_registered_in_upper_case_finds_itself(otad):
    await otad.add_device(MAC.upper(), 9)
    await activate_board(otad)
    _, body = await otad.upload("xiaozhi-1.9.3", 9, FIRMWARE)
    await _pin(otad, body["data"])
    _, reply = await check(otad)
    assert reply["firmware"]["version"] == "1.9.3"
    assert otad.db_rows("device") == 1
