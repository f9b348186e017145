"""xiaozhi boards activate before they are devices: the firmware's own flow (a code on the board's
screen, its POST .../activate answered 202 then 200), accepted by the operator over the API or the
CLI; unauthenticated checks never create, join or overwrite devices; and a force pin is not a
reflash loop."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid

import pytest

from otad.service import xiaozhi
from tests.conftest import db_query, make_settings, start_otad
from tests.helpers import assert_error
from tests.test_cli import otad_cli
from tests.test_xiaozhi import FIRMWARE, MAC, activate_board, board_body, board_headers, check, client_of

DEFAULT_PRODUCT = 9


@contextlib.asynccontextmanager
async def enrolling_daemon(data_dir):
    """A daemon that enrolls unknown boards into product 9, which has 1.9.3 pinned."""
    instance = await start_otad(make_settings(data_dir, **{
        "xiaozhi.default_product_id": str(DEFAULT_PRODUCT),
        "xiaozhi.websocket": {"url": "wss://voice.example/xiaozhi/v1/", "token": "secret-voice-token"}}))
    try:
        _, body = await instance.upload("xiaozhi-1.9.3", DEFAULT_PRODUCT, FIRMWARE)
        instance.package = body["data"]
        status, _ = await instance.request("POST", "/api/v2/xiaozhi/otaPassive", json={
            "otaId": body["data"]["id"], "productId": DEFAULT_PRODUCT, "versionName": "1.9.3"})
        assert status == 200
        yield instance
    finally:
        await instance.stop()


@pytest.fixture
async def enrolling(tmp_path):
    async with enrolling_daemon(tmp_path / "data") as instance:
        yield instance


async def board_activate(otad, mac: str = MAC, client_id: str | None = None, body: dict | None = None,
                         path: str = "/xiaozhi/ota/activate"):
    """The board's Ota::Activate(): its check headers, and "{}" or the serial-number payload."""
    headers = board_headers(mac, client_id=client_id)
    async with otad.session.post(otad.url + path, json=body if body is not None else {}, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def pending(otad) -> list[dict]:
    status, body = await otad.request("GET", "/api/v2/xiaozhi/pending")
    assert status == 200, body
    return body["data"]


async def devices(otad) -> list[dict]:
    _, body = await otad.request("GET", "/api/v2/devices")
    return body["data"]


async def test_unknown_board_gets_an_activation_code_and_no_firmware(enrolling):
    status, reply = await check(enrolling)
    assert status == 200
    activation = reply["activation"]
    assert set(activation) == {"message", "code", "challenge", "timeout_ms"}
    assert re.fullmatch(r"[0-9]{6}", activation["code"]) and activation["code"] in activation["message"]
    assert isinstance(activation["challenge"], str) and activation["challenge"]
    assert isinstance(activation["timeout_ms"], int) and activation["timeout_ms"] > 0
    assert reply["firmware"] == {"version": "1.9.2", "url": ""}  # 1.9.3 is pinned, but not for it yet
    assert "websocket" not in reply  # no voice-server token for a board nobody accepted
    assert enrolling.db_rows("device") == 0 and await devices(enrolling) == []

    # The board asks, as its firmware does after showing the code: not yet.
    assert (await board_activate(enrolling))[0] == 202
    # Its next check (after 10 activate calls) shows the same code, so what the operator reads stays true.
    _, again = await check(enrolling)
    assert (again["activation"]["code"], again["activation"]["challenge"]) == (activation["code"],
                                                                               activation["challenge"])
    [waiting] = await pending(enrolling)
    assert (waiting["deviceName"], waiting["clientId"], waiting["productId"], waiting["existingDevice"]) == (
        MAC, client_of(MAC), DEFAULT_PRODUCT, False)
    assert activation["code"] not in str(waiting)  # the code is read off the board, not off the list


async def test_activation_by_api_makes_the_board_a_device_that_gets_firmware(enrolling):
    _, reply = await check(enrolling)
    code, challenge = reply["activation"]["code"], reply["activation"]["challenge"]
    serial = {"algorithm": "hmac-sha256", "serial_number": "SN-0001", "challenge": challenge, "hmac": "00" * 32}
    assert (await board_activate(enrolling, body=serial))[0] == 202

    status, body = await enrolling.request("POST", "/api/v2/xiaozhi/activate", json={"code": code})
    assert status == 200, body
    assert (body["data"]["deviceName"], body["data"]["productId"], body["data"]["clientId"],
            body["data"]["newDevice"]) == (MAC, DEFAULT_PRODUCT, client_of(MAC), True)

    for path in ("/xiaozhi/ota/activate", "/xiaozhi/ota/activate/"):  # the URL with or without the slash
        assert (await board_activate(enrolling, body=serial, path=path))[0] == 200
    status, reply = await check(enrolling)
    assert status == 200 and "activation" not in reply
    assert reply["firmware"] == {"version": "1.9.3",
                                 "url": f"{enrolling.url}/api/v2/micro/{enrolling.package['fileName']}"}
    assert reply["websocket"]["token"] == "secret-voice-token"
    [board] = await devices(enrolling)
    assert (board["deviceName"], board["productId"], board["appVersion"]) == (MAC, DEFAULT_PRODUCT, "1.9.2")
    assert await pending(enrolling) == []
    # The code was used up.
    status, body = await enrolling.request("POST", "/api/v2/xiaozhi/activate", json={"code": code})
    assert_error(status, body, 404, 1001)


async def test_activation_by_cli_while_the_daemon_runs(enrolling):
    _, reply = await check(enrolling)
    code = reply["activation"]["code"]
    data_dir = enrolling.settings.data_dir

    listed = await asyncio.to_thread(otad_cli, data_dir, "device", "pending")
    assert listed.returncode == 0, listed.stderr
    assert MAC in listed.stdout and client_of(MAC) in listed.stdout and code not in listed.stdout

    wrong = await asyncio.to_thread(otad_cli, data_dir, "device", "activate", "12345x")
    assert wrong.returncode != 0 and "digits" in wrong.stderr
    activated = await asyncio.to_thread(otad_cli, data_dir, "device", "activate", code)
    assert activated.returncode == 0, activated.stderr
    assert MAC in activated.stdout and f"product {DEFAULT_PRODUCT}" in activated.stdout

    assert (await board_activate(enrolling))[0] == 200
    _, reply = await check(enrolling)
    assert reply["firmware"]["version"] == "1.9.3" and reply["firmware"]["url"]
    assert [d["deviceName"] for d in await devices(enrolling)] == [MAC]


async def test_a_check_with_another_client_id_changes_nothing(enrolling):
    await activate_board(enrolling)
    await check(enrolling)  # the real board, now a device, reports its inventory
    other = str(uuid.uuid4())
    async with enrolling.session.post(enrolling.url + "/xiaozhi/ota/", json={
            **board_body(MAC, "0.0.1"), "chip_model_name": "forged"},
            headers=board_headers(MAC, "0.0.1", client_id=other)) as response:
        assert response.status == 200
        reply = await response.json()
    assert reply["firmware"] == {"version": "0.0.1", "url": ""}
    assert reply["activation"]["code"]  # it may only ask to be accepted, like any unknown board
    assert "websocket" not in reply
    [board] = await devices(enrolling)
    assert (board["appVersion"], board["chip"]) == ("1.9.2", "esp32s3")  # what the real board reported
    assert (await board_activate(enrolling, client_id=other))[0] == 202
    # The real board is unaffected.
    assert (await board_activate(enrolling))[0] == 200
    _, reply = await check(enrolling)
    assert reply["firmware"]["url"] and "activation" not in reply


async def test_a_check_naming_an_ordinary_device_does_not_touch_it(otad):
    """A device added over the API (an MQTT gateway) is not a board: a check naming it gets no firmware
    and writes nothing on it, even with a pin for its product and no enrolment configured."""
    await otad.add_device("dev1", 9)
    _, body = await otad.upload("xiaozhi-1.9.3", 9, FIRMWARE)
    await otad.request("POST", "/api/v2/xiaozhi/otaPassive",
                       json={"otaId": body["data"]["id"], "productId": 9, "versionName": "1.9.3"})
    status, reply = await check(otad, mac="dev1", client_id=str(uuid.uuid4()))
    assert status == 200
    assert reply["firmware"] == {"version": "1.9.2", "url": ""}
    [device] = await devices(otad)
    assert device["deviceName"] == "dev1"
    assert (device["appVersion"], device["boardType"], device["chip"], device["remoteAddr"],
            device["lastCheckAt"]) == (None, None, None, None, None)
    [waiting] = await pending(otad)
    assert (waiting["deviceName"], waiting["existingDevice"]) == ("dev1", True)


async def test_a_flood_of_fake_boards_stays_at_the_pending_cap(tmp_path, monkeypatch):
    # The cap is 1,000; a smaller one makes the same flood (several times the cap, in concurrent
    # bursts) take a second instead of twenty, every check being a committed write.
    assert xiaozhi.PENDING_LIMIT == 1000
    cap = 40
    monkeypatch.setattr(xiaozhi, "PENDING_LIMIT", cap)
    macs = [f"02:00:00:00:{i >> 8 & 0xff:02x}:{i & 0xff:02x}" for i in range(4 * cap)]
    codes: dict[str, str] = {}
    async with enrolling_daemon(tmp_path / "data") as otad:

        async def fake(mac: str) -> None:
            status, reply = await check(otad, mac=mac)
            assert status == 200 and reply["firmware"]["url"] == ""
            if "activation" in reply:
                codes[mac] = reply["activation"]["code"]

        for start in range(0, len(macs), 20):
            await asyncio.gather(*(fake(mac) for mac in macs[start:start + 20]))
            assert otad.db_rows("xiaozhi_activation") == min(start + 20, cap)
        assert len(await pending(otad)) == cap
        assert len(codes) == cap and len(set(codes.values())) == cap  # the rest were shown no code
        assert otad.db_rows("device") == 0
        # Full, the boards already waiting keep their codes: the first one can still be accepted.
        first = next(mac for mac in macs if mac in codes)
        status, _ = await otad.request("POST", "/api/v2/xiaozhi/activate", json={"code": codes[first]})
        assert status == 200
        assert otad.db_rows("device") == 1


async def test_an_expired_claim_is_forgotten_and_the_board_gets_a_new_code(enrolling):
    _, reply = await check(enrolling)
    old = reply["activation"]["code"]
    # Time passes (the claim's expiry moved into the past rather than waiting ten minutes).
    db_query(enrolling.settings, "UPDATE xiaozhi_activation SET expires_at = '2000-01-01 00:00:00+00:00'")
    assert await pending(enrolling) == []
    assert (await board_activate(enrolling))[0] == 404
    status, _ = await enrolling.request("POST", "/api/v2/xiaozhi/activate", json={"code": old})
    assert status == 404
    _, reply = await check(enrolling)
    assert reply["activation"]["code"] and enrolling.db_rows("xiaozhi_activation") == 1


async def test_deleting_the_device_ends_the_boards_activation(enrolling):
    await activate_board(enrolling)
    status, _ = await enrolling.request("DELETE", "/api/v2/devices", params={"deviceName": MAC})
    assert status == 200
    assert enrolling.db_rows("xiaozhi_activation") == 0
    _, reply = await check(enrolling)
    assert reply["activation"] and reply["firmware"]["url"] == "" and enrolling.db_rows("device") == 0


@pytest.mark.parametrize("board_version, offered", [("1.9.3", False), ("1.9.2", True), ("2.0.0", True)])
async def test_force_pin_is_sent_only_to_boards_not_on_the_pinned_version(enrolling, board_version, offered):
    status, _ = await enrolling.request("POST", "/api/v2/xiaozhi/otaPassive", json={
        "otaId": enrolling.package["id"], "productId": DEFAULT_PRODUCT, "versionName": "1.9.3", "force": True})
    assert status == 200
    await activate_board(enrolling)
    _, reply = await check(enrolling, version=board_version)
    if offered:
        assert reply["firmware"]["force"] == 1 and reply["firmware"]["version"] == "1.9.3"
        assert reply["firmware"]["url"].endswith(enrolling.package["fileName"])
    else:
        # Firmware treats force == 1 as "new version" whatever it runs: this would reflash forever.
        assert reply["firmware"] == {"version": "1.9.3", "url": ""}


async def test_bad_activation_requests(enrolling):
    _, reply = await check(enrolling)
    for body, want in (({"code": "12345"}, 400), ({"code": 123456}, 400), ({}, 400), ([], 400),
                       ({"code": "999999" if reply["activation"]["code"] != "999999" else "999998"}, 404)):
        status, answer = await enrolling.request("POST", "/api/v2/xiaozhi/activate", json=body)
        assert status == want and answer["success"] is False, (body, answer)
    status, answer = await enrolling.request("POST", "/api/v2/xiaozhi/activate", auth=False,
                                             json={"code": reply["activation"]["code"]})
    assert_error(status, answer, 401, 2001)
    status, _ = await enrolling.request("GET", "/api/v2/xiaozhi/pending", auth=False)
    assert status == 401
    # The board's own call: headers required, a stale challenge refused, an unknown board told to check.
    async with enrolling.session.post(enrolling.url + "/xiaozhi/ota/activate", json={}) as response:
        assert response.status == 400
    status, _ = await board_activate(enrolling, body={"challenge": "not-the-one"})
    assert status == 400
    assert (await board_activate(enrolling, mac="11:22:33:44:55:66"))[0] == 404
    assert enrolling.db_rows("device") == 0
