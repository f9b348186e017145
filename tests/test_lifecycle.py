"""Upgrades tracked to their end: device reports, timeline, timeouts, cancel, supersede."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone

from tests.conftest import make_settings, start_otad
from tests.helpers import assert_error

COMMAND = "/oc/devices/{}/sys/ota"
REPORT = "/oc/devices/{}/sys/ota/report"
REPLY = "/oc/devices/{}/sys/ota/report_reply"


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


async def _device(otad, name: str = "dev1"):
    password = await otad.add_device(name, 1)
    device = otad.device(name, password)
    device.password = password
    assert await device.connect() == 0
    assert await device.subscribe(COMMAND.format(name)) == [1]
    assert await device.subscribe(REPLY.format(name)) == [1]
    return device


async def _report(device, name: str, **report) -> dict:
    await device.publish(REPORT.format(name), json.dumps(report).encode())
    while True:
        message = await device.next_message()
        if message.topic == REPLY.format(name):
            return json.loads(message.payload)


async def _upgrade(otad, version: str) -> dict:
    status, body = await otad.request("GET", f"/api/v2/upgrades/{version}")
    assert status == 200, body
    return body["data"]


async def _enable(otad, device, name: str = "dev1", **params) -> str:
    status, body = await otad.request("POST", "/api/v2/otaEnable", params={"name": "fw", "deviceName": name,
                                                                           **params})
    assert status == 200, body
    version = body["data"][0]["version"]
    assert json.loads((await device.next_message()).payload)["version"] == version
    return version


async def test_full_state_machine_driven_by_a_real_device(otad):
    device = await _device(otad)
    await otad.upload("fw", 1, b"image")
    version = await _enable(otad, device)
    assert (await _upgrade(otad, version))["state"] == "notified"

    for status, progress in (("downloading", 10), ("downloading", 80), ("downloaded", 100), ("verified", None),
                             ("updating", None)):
        reply = await _report(device, "dev1", version=version, status=status, progress=progress, message="ok")
        assert reply == {"version": version, "accepted": True, "errorMsg": ""}
    reply = await _report(device, "dev1", version=version, status="updated", currentVersion="2.0.0")
    assert reply["accepted"] is True

    upgrade = await _upgrade(otad, version)
    assert upgrade["state"] == "updated" and upgrade["finishedAt"]
    states = [event["state"] for event in upgrade["timeline"]]
    # The two "downloading" reports are one entry: counted, with the latest progress.
    assert states == ["created", "notified", "downloading", "downloaded", "verified", "updating", "updated"]
    downloading = upgrade["timeline"][2]
    assert downloading["count"] == 2 and json.loads(downloading["detail"])["progress"] == 80
    assert downloading["lastAt"] >= downloading["at"]
    assert [event["source"] for event in upgrade["timeline"]][2:] == ["device"] * 5
    assert upgrade["progress"] == 100
    _, devices = await otad.request("GET", "/api/v2/devices")
    assert devices["data"][0]["firmwareVersion"] == "2.0.0" and devices["data"][0]["online"] is True

    # A finished upgrade is never delivered again.
    again = otad.device("dev1", device.password, client_id="dev1-again")
    assert await again.connect() == 0
    await again.subscribe(COMMAND.format("dev1"))
    assert await again.no_message(within=0.7)
    await again.close()
    await device.close()


async def test_out_of_order_duplicate_and_bad_reports(otad):
    device = await _device(otad)
    await otad.upload("fw", 1, b"image")
    version = await _enable(otad, device)
    assert (await _report(device, "dev1", version=version, status="verified"))["accepted"] is True
    assert (await _report(device, "dev1", version=version, status="downloading", progress=5))["accepted"] is True
    assert (await _report(device, "dev1", version=version, status="verified"))["accepted"] is True
    upgrade = await _upgrade(otad, version)
    assert upgrade["state"] == "verified"  # the late "downloading" did not move it back
    assert [e["state"] for e in upgrade["timeline"]] == ["created", "notified", "verified", "downloading",
                                                         "verified"]

    for bad, why in ((b"not json", "JSON"), (b"[1]", "object"), (b'{"status":"updated"}', "version"),
                     (json.dumps({"version": version, "status": "exploded"}).encode(), "status"),
                     (json.dumps({"version": version, "status": "downloading", "progress": 101}).encode(),
                      "progress"),
                     (json.dumps({"version": "00000000-0000-4000-8000-000000000000",
                                  "status": "updated"}).encode(), "no such upgrade")):
        await device.publish(REPORT.format("dev1"), bad)
        while (message := await device.next_message()).topic != REPLY.format("dev1"):
            pass
        reply = json.loads(message.payload)
        assert reply["accepted"] is False and why in reply["errorMsg"], (bad, reply)
    assert (await _upgrade(otad, version))["state"] == "verified"
    await device.close()


async def test_a_device_cannot_report_on_another_devices_upgrade(otad):
    dev1 = await _device(otad, "dev1")
    dev2 = await _device(otad, "dev2")
    await otad.upload("fw", 1, b"image")
    version = await _enable(otad, dev1)
    reply = await _report(dev2, "dev2", version=version, status="failed")
    assert reply["accepted"] is False
    assert (await _upgrade(otad, version))["state"] == "notified"
    await dev1.close()
    await dev2.close()


async def test_timeout_with_a_controllable_clock(tmp_path):
    clock = FakeClock()
    otad = await start_otad(make_settings(tmp_path / "d"), clock=clock)
    try:
        device = await _device(otad)
        await otad.upload("fw", 1, b"image")
        version = await _enable(otad, device, timeout="60")
        assert (await _upgrade(otad, version))["timeoutAt"] == "2026-11-26T12:01:00Z"
        clock.now += timedelta(seconds=59)
        assert await otad.daemon.services.upgrades.expire_due() == 0
        clock.now += timedelta(seconds=2)
        assert await otad.daemon.services.upgrades.expire_due() == 1
        upgrade = await _upgrade(otad, version)
        assert upgrade["state"] == "timed_out" and upgrade["timeline"][-1]["source"] == "timeout"
        reply = await _report(device, "dev1", version=version, status="updated")
        assert reply["accepted"] is False and "timed_out" in reply["errorMsg"]
        await device.close()
    finally:
        await otad.stop()


async def test_cancel_withdraws_the_command(otad):
    device = await _device(otad)
    await otad.upload("fw", 1, b"image")
    version = await _enable(otad, device)
    status, body = await otad.request("POST", f"/api/v2/upgrades/{version}/cancel")
    assert status == 200 and body["data"]["state"] == "cancelled"
    status, body = await otad.request("POST", f"/api/v2/upgrades/{version}/cancel")
    assert_error(status, body, 409, 1001)
    status, body = await otad.request("POST", "/api/v2/upgrades/nope/cancel")
    assert_error(status, body, 404, 1001)
    fresh = otad.device("dev1", device.password, client_id="dev1-fresh")
    assert await fresh.connect() == 0
    await fresh.subscribe(COMMAND.format("dev1"))
    assert await fresh.no_message(within=0.7)
    await fresh.close()
    await device.close()


async def test_a_newer_enable_supersedes_and_the_old_one_is_refused(otad):
    device = await _device(otad)
    await otad.upload("fw", 1, b"image")
    first = await _enable(otad, device)
    second = await _enable(otad, device)
    assert (await _upgrade(otad, first))["state"] == "superseded"
    reply = await _report(device, "dev1", version=first, status="updated")
    assert reply["accepted"] is False and "superseded" in reply["errorMsg"]
    assert (await _report(device, "dev1", version=second, status="updated"))["accepted"] is True
    await device.close()


async def test_downloading_the_file_is_evidence(otad):
    device = await _device(otad)
    _, body = await otad.upload("fw", 1, b"image")
    version = await _enable(otad, device)
    async with otad.session.get(f"{otad.url}/api/v2/micro/{body['data']['fileName']}",
                                params={"deviceName": "dev1"}) as response:
        assert response.status == 200 and await response.read() == b"image"
    upgrade = await _upgrade(otad, version)
    assert upgrade["state"] == "downloading" and upgrade["timeline"][-1]["source"] == "download"
    await device.close()


async def test_presence_and_history_listing(otad):
    device = await _device(otad)
    await otad.add_device("dev2", 1)
    await otad.upload("fw", 1, b"image")
    for _ in range(3):
        await _enable(otad, device)
    status, body = await otad.request("GET", "/api/v2/upgrades", params={"deviceName": "dev1", "pageSize": "2"})
    assert status == 200 and body["data"]["total"] == 3 and len(body["data"]["items"]) == 2
    status, body = await otad.request("GET", "/api/v2/upgrades", params={"state": "superseded"})
    assert body["data"]["total"] == 2
    status, body = await otad.request("GET", "/api/v2/upgrades", params={"state": "bogus"})
    assert_error(status, body, 400, 1001)
    _, devices = await otad.request("GET", "/api/v2/devices")
    assert {d["deviceName"]: d["online"] for d in devices["data"]} == {"dev1": True, "dev2": False}
    await device.close()
    await otad.daemon.services.devices.flush_presence()

    async def offline() -> bool:
        _, body = await otad.request("GET", "/api/v2/devices")
        return {d["deviceName"]: d["online"] for d in body["data"]}["dev1"] is False
    for _ in range(50):
        if await offline():
            break
        await asyncio.sleep(0.1)
    assert await offline()
