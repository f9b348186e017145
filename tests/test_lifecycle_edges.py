"""Edge cases found in review: races, bounds, and what must not be sent twice."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import make_settings, start_otad
from tests.rawmqtt import RawClient, publish_packet
from tests.simulated_devices import start_fleet, stop_fleet
from tests.helpers import assert_error
from tests.helpers import campaign_body as _create_body, get_campaign as _campaign
from tests.helpers import register_fleet as _register, wait_for_campaign as _wait_for


async def _open_upgrades(otad, campaign_id: int) -> dict:
    return (await _campaign(otad, campaign_id))["states"]


async def test_cancelling_a_busy_campaign_leaves_nothing_open(otad):
    passwords = await _register(otad, 120)
    await otad.upload("fw-2.0", 7, b"fw")
    fleet = await start_fleet(otad.mqtt_port, passwords, fails=lambda name: False)
    try:
        # Devices report while the cancel arrives: every upgrade must still end cancelled or updated.
        _, body = await otad.request("POST", "/api/v2/campaigns", json=_create_body(stages=[100], notifyRate=400,
                                                                                   maxConcurrent=120))
        await asyncio.sleep(0.6)
        status, _ = await otad.request("POST", f"/api/v2/campaigns/{body['data']['id']}/cancel")
        assert status == 200
        await asyncio.sleep(1.2)  # a few engine ticks
        states = await _open_upgrades(otad, body["data"]["id"])
        assert set(states) <= {"cancelled", "updated"}, states
    finally:
        await stop_fleet(fleet)


async def test_resume_after_a_self_pause_counts_only_new_failures(otad):
    passwords = await _register(otad, 10)
    await otad.upload("fw-2.0", 7, b"fw")
    first = sorted(passwords)[0]
    fleet = await start_fleet(otad.mqtt_port, passwords, fails=lambda name: name == first)
    try:
        _, body = await otad.request("POST", "/api/v2/campaigns",
                                     json=_create_body(stages=[100], failureThreshold=0.05, successThreshold=0.5))
        campaign_id = body["data"]["id"]
        assert (await _wait_for(otad, campaign_id, {"paused", "finished"}))["state"] == "paused"
        status, _ = await otad.request("POST", f"/api/v2/campaigns/{campaign_id}/resume")
        assert status == 200
        campaign = await _wait_for(otad, campaign_id, {"paused", "finished"})
        assert campaign["state"] == "finished", campaign
        assert campaign["states"] == {"failed": 1, "updated": 9}
    finally:
        await stop_fleet(fleet)


async def test_a_slow_notify_rate_still_sends(otad):
    passwords = await _register(otad, 2)
    await otad.upload("fw-2.0", 7, b"fw")
    fleet = await start_fleet(otad.mqtt_port, passwords, fails=lambda name: False)
    try:
        _, body = await otad.request("POST", "/api/v2/campaigns", json=_create_body(stages=[100], notifyRate=0.5))
        await asyncio.sleep(1.5)
        assert sum((await _open_upgrades(otad, body["data"]["id"])).values()) >= 1
    finally:
        await stop_fleet(fleet)


async def test_a_campaign_leaves_a_manual_upgrade_in_progress_alone(otad):
    passwords = await _register(otad, 1)
    await otad.upload("fw-2.0", 7, b"fw")
    await otad.upload("hotfix", 7, b"hot")
    status, body = await otad.enable("hotfix", "gw-000")
    manual = body["data"][0]["version"]
    client = RawClient(otad.mqtt_port)
    assert (await client.connect("gw-000-x", "gw-000", passwords["gw-000"]))[1] == 0
    report = json.dumps({"version": manual, "status": "updating"}).encode()
    await client.publish("/oc/devices/gw-000/sys/ota/report", report, qos=1)
    await asyncio.sleep(0.3)
    _, created = await otad.request("POST", "/api/v2/campaigns", json=_create_body(stages=[100]))
    await asyncio.sleep(1.2)
    status, upgrade = await otad.request("GET", f"/api/v2/upgrades/{manual}")
    assert upgrade["data"]["state"] == "updating"  # not superseded by the campaign
    assert (await _campaign(otad, created["data"]["id"]))["states"] == {}
    await client.close()


async def test_bad_numbers_and_ids_are_answered_not_crashed(otad):
    await otad.add_device("dev1", 7)
    await otad.upload("fw-2.0", 7, b"fw")
    for raw in (b'{"name":"fw-2.0","productId":7,"timeout":Infinity}', b'{"name":"fw-2.0","productId":7,"notifyRate":NaN}',
                b'{"name":"fw-2.0","productId":7,"timeout":1e300}'):
        status, body = await otad.request("POST", "/api/v2/campaigns", data=raw,
                                          headers={"Content-Type": "application/json"})
        assert status == 400 and body["success"] is False, raw
    status, body = await otad.request("POST", "/api/v2/otaEnable", params={"name": "fw-2.0", "deviceName": "dev1",
                                                                           "timeout": "9223372036854775807"})
    assert_error(status, body, 400, 1001)
    status, body = await otad.request("GET", "/api/v2/upgrades", params={"page": "9223372036854775807"})
    assert status == 200 and body["data"]["items"] == []
    status, body = await otad.request("GET", "/api/v2/upgrades/" + "x" * 40)
    assert_error(status, body, 404, 1001)


async def test_the_package_of_an_ended_campaign_can_be_deleted(otad):
    _, package = await otad.upload("fw-2.0", 7, b"fw")
    _, body = await otad.request("POST", "/api/v2/campaigns", json=_create_body(stages=[100]))
    status, refused = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(package["data"]["id"])})
    assert_error(status, refused, 409, 3002)
    assert f"campaign {body['data']['id']}" in refused["errorMsg"]
    await otad.request("POST", f"/api/v2/campaigns/{body['data']['id']}/cancel")
    status, _ = await otad.request("DELETE", "/api/v2/otaDelete", params={"id": str(package["data"]["id"])})
    assert status == 200


async def test_online_flags_are_reset_when_the_daemon_starts(tmp_path):
    otad = await start_otad(make_settings(tmp_path / "d"))
    try:
        password = await otad.add_device("dev1", 1)
        device = otad.device("dev1", password)
        assert await device.connect() == 0
        await otad.daemon.services.devices.flush_presence()
        device.client.loop_stop()  # vanish without a word, as with kill -9 the daemon would not notice
        await otad.restart()
        _, body = await otad.request("GET", "/api/v2/devices")
        assert body["data"][0]["online"] is False
    finally:
        await otad.stop()


async def test_a_cancelled_command_is_not_redelivered_from_the_in_flight_store(otad):
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"fw")
    holder = RawClient(otad.mqtt_port, auto_ack=False)
    assert (await holder.connect("dev1", "dev1", password, clean=False, will=("/oc/devices/dev1/gone", b"", 0,
                                                                                False)))[1] == 0
    await holder.subscribe(("/oc/devices/dev1/sys/ota", 1))
    watcher = RawClient(otad.mqtt_port)
    assert (await watcher.connect("dev1-w", "dev1", password))[1] == 0
    await watcher.subscribe(("/oc/devices/dev1/gone", 0))
    _, body = await otad.enable("fw", "dev1")
    version = body["data"][0]["version"]
    assert json.loads((await holder.message()).payload)["version"] == version  # received, never acknowledged
    await holder.close()
    await watcher.message()  # the broker noticed the holder is gone
    await otad.request("POST", f"/api/v2/upgrades/{version}/cancel")
    again = RawClient(otad.mqtt_port)
    assert await again.connect("dev1", "dev1", password, clean=False) == (True, 0)
    assert await again.no_message(within=1.0)
    await again.close()
    await watcher.close()


async def test_a_persistent_device_that_resubscribes_gets_the_command_once(otad):
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"fw")
    first = RawClient(otad.mqtt_port)
    assert (await first.connect("dev1", "dev1", password, clean=False))[1] == 0
    await first.subscribe(("/oc/devices/dev1/sys/ota", 1))
    await first.close()
    await asyncio.sleep(0.3)
    await otad.enable("fw", "dev1")
    again = RawClient(otad.mqtt_port)
    assert await again.connect("dev1", "dev1", password, clean=False) == (True, 0)
    assert b"fileName" in (await again.message()).payload
    await again.subscribe(("/oc/devices/dev1/sys/ota", 1))  # as many devices do on every connect
    assert await again.no_message(within=0.7)
    await again.close()


async def test_oversized_reports_are_stored_compactly(otad):
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"fw")
    _, body = await otad.enable("fw", "dev1")
    version = body["data"][0]["version"]
    client = RawClient(otad.mqtt_port)
    assert (await client.connect("dev1-r", "dev1", password))[1] == 0
    report = {"version": version, "status": "downloading", "junk": "x" * 500_000}
    client.send(publish_packet("/oc/devices/dev1/sys/ota/report", json.dumps(report).encode(), qos=0))
    await asyncio.sleep(0.5)
    _, upgrade = await otad.request("GET", f"/api/v2/upgrades/{version}")
    assert upgrade["data"]["state"] == "downloading"
    assert all(len(event["detail"] or "") < 1000 for event in upgrade["data"]["timeline"])
    await client.close()
