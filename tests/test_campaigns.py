"""Staged rollouts over hundreds of real connected devices."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp

from otad.service.campaigns import stage_of
from tests.conftest import free_port
from tests.simulated_devices import start_fleet, stop_fleet
from tests.helpers import FLEET, assert_error
from tests.helpers import campaign_body as _create_body, get_campaign as _campaign
from tests.helpers import register_fleet as _register, wait_for_campaign as _wait_for

async def test_campaign_rolls_out_stage_by_stage_to_every_device(otad):
    passwords = await _register(otad)
    await otad.upload("fw-2.0", 7, b"new firmware")
    fleet = await start_fleet(otad.mqtt_port, passwords, fails=lambda name: False)
    try:
        status, body = await otad.request("POST", "/api/v2/campaigns", json=_create_body())
        assert status == 200 and body["data"]["state"] == "running"
        campaign = await _wait_for(otad, body["data"]["id"], {"finished", "paused"})
        assert campaign["state"] == "finished", campaign
        assert campaign["states"] == {"updated": FLEET}
        assert sum(stage["devices"] for stage in campaign["stageProgress"]) == FLEET
        assert all(len(device.commands) == 1 for device in fleet)  # each device told exactly once
        canaries = {d.name for d in fleet if stage_of(7, "fw-2.0", d.name, [1, 10, 50, 100]) == 0}
        assert campaign["stageProgress"][0]["devices"] == len(canaries)
    finally:
        await stop_fleet(fleet)


async def test_failures_pause_the_campaign_before_it_reaches_everyone(otad):
    passwords = await _register(otad)
    await otad.upload("fw-2.0", 7, b"bad firmware")
    failing = {name for index, name in enumerate(sorted(passwords)) if index % 4 == 0}  # 25% fail
    fleet = await start_fleet(otad.mqtt_port, passwords, fails=lambda name: name in failing)
    try:
        _, body = await otad.request("POST", "/api/v2/campaigns", json=_create_body())
        campaign = await _wait_for(otad, body["data"]["id"], {"paused", "finished"})
        assert campaign["state"] == "paused" and "failed" in campaign["reason"]
        told = sum(campaign["states"].values())
        assert 0 < told < FLEET
        await asyncio.sleep(1.5)
        assert sum((await _campaign(otad, body["data"]["id"]))["states"].values()) == told  # stays paused
        status, resumed = await otad.request("POST", f"/api/v2/campaigns/{body['data']['id']}/cancel")
        assert status == 200 and resumed["data"]["state"] == "cancelled"
        status, again = await otad.request("POST", f"/api/v2/campaigns/{body['data']['id']}/resume")
        assert_error(status, again, 409, 1001)
    finally:
        await stop_fleet(fleet)


async def test_pause_resume_and_devices_that_join_later(otad):
    passwords = await _register(otad, 20)
    await otad.upload("fw-2.0", 7, b"fw")
    _, body = await otad.request("POST", "/api/v2/campaigns", json=_create_body(stages=[100], notifyRate=100))
    campaign_id = body["data"]["id"]
    status, paused = await otad.request("POST", f"/api/v2/campaigns/{campaign_id}/pause")
    assert status == 200 and paused["data"]["state"] == "paused"
    status, body = await otad.request("POST", f"/api/v2/campaigns/{campaign_id}/pause")
    assert_error(status, body, 409, 1001)
    await asyncio.sleep(1.0)
    told = sum((await _campaign(otad, campaign_id))["states"].values())
    assert told < 20  # the engine stopped sending while paused
    passwords["gw-late"] = await otad.add_device("gw-late", 7)  # joins the product mid-rollout
    fleet = await start_fleet(otad.mqtt_port, passwords, fails=lambda name: False)
    try:
        status, resumed = await otad.request("POST", f"/api/v2/campaigns/{campaign_id}/resume")
        assert status == 200 and resumed["data"]["state"] == "running"
        campaign = await _wait_for(otad, campaign_id, {"finished", "paused"})
        assert campaign["state"] == "finished" and campaign["states"] == {"updated": 21}
        late = next(device for device in fleet if device.name == "gw-late")
        assert len(late.commands) == 1
    finally:
        await stop_fleet(fleet)


def test_stage_assignment_is_deterministic_and_cumulative():
    names = [f"gw-{i:03d}" for i in range(1000)]
    first = [stage_of(7, "fw-2.0", n, [1, 10, 50, 100]) for n in names]
    assert first == [stage_of(7, "fw-2.0", n, [1, 10, 50, 100]) for n in names]  # a rerun: same canaries
    shares = [first.count(stage) / len(names) for stage in range(4)]
    assert 0.0 < shares[0] < 0.03 and 0.05 < shares[1] < 0.14 and 0.34 < shares[2] < 0.46
    assert stage_of(7, "fw-2.0", "x", [50]) in (0, None)
    assert [stage_of(7, "other", n, [1, 10, 50, 100]) for n in names] != first


async def test_campaign_validation(otad):
    await otad.upload("fw-2.0", 7, b"fw")
    for bad in ({"stages": [50, 10]}, {"stages": [0, 100]}, {"stages": []}, {"successThreshold": 2},
                {"notifyRate": 0}, {"maxConcurrent": 0}, {"name": "missing"}):
        status, body = await otad.request("POST", "/api/v2/campaigns", json=_create_body(**bad))
        assert status in (400, 404) and body["success"] is False, bad
    status, body = await otad.request("GET", "/api/v2/campaigns/999")
    assert_error(status, body, 404, 1001)


async def test_kill_9_mid_campaign_then_restart_finishes_without_duplicates(tmp_path):
    http_port, mqtt_port = free_port(), free_port()
    data_dir = tmp_path / "data"

    def serve() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "otad", "serve", "--data-dir", str(data_dir), "--http-host", "127.0.0.1",
             "--http-port", str(http_port), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port),
             "--log-level", "warning"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)

    token = subprocess.run([sys.executable, "-m", "otad", "token", "create", "t", "--data-dir", str(data_dir)],
                           capture_output=True, text=True, timeout=60).stdout.splitlines()[-1]
    headers = {"Authorization": token}
    base = f"http://127.0.0.1:{http_port}"
    process = serve()
    fleet = []
    try:
        async with aiohttp.ClientSession(headers=headers) as http:
            await _until_up(http, base)
            async with http.post(f"{base}/api/v2/devices", json=[{"deviceName": f"gw-{i:03d}", "productId": 7}
                                                                for i in range(FLEET)]) as response:
                passwords = {e["deviceName"]: e["password"] for e in (await response.json())["data"]}
            form = aiohttp.FormData()
            form.add_field("file", b"fw", filename="fw.bin")
            async with http.post(f"{base}/api/v2/otaUpload", params={"name": "fw-2.0", "productId": "7"},
                                 data=form) as response:
                assert response.status == 200
            fleet = await start_fleet(mqtt_port, passwords, fails=lambda name: False)
            async with http.post(f"{base}/api/v2/campaigns",
                                 json=_create_body(stages=[10, 100], notifyRate=60, maxConcurrent=20)) as response:
                campaign_id = (await response.json())["data"]["id"]
            while True:  # until the rollout is well under way
                async with http.get(f"{base}/api/v2/campaigns/{campaign_id}") as response:
                    states = (await response.json())["data"]["states"]
                if states.get("updated", 0) >= 40:
                    break
                await asyncio.sleep(0.1)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
            await stop_fleet(fleet)

            process = serve()
            await _until_up(http, base)
            fleet = await start_fleet(mqtt_port, passwords, fails=lambda name: False)
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                async with http.get(f"{base}/api/v2/campaigns/{campaign_id}") as response:
                    campaign = (await response.json())["data"]
                if campaign["state"] == "finished":
                    break
                assert asyncio.get_running_loop().time() < deadline, campaign
                await asyncio.sleep(0.2)
            async with http.get(f"{base}/api/v2/upgrades", params={"campaign": str(campaign_id),
                                                                   "pageSize": "500"}) as response:
                upgrades = (await response.json())["data"]["items"]
        assert len(upgrades) == FLEET and len({u["deviceName"] for u in upgrades}) == FLEET  # none twice
        assert {u["state"] for u in upgrades} == {"updated"}
    finally:
        await stop_fleet(fleet)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


async def _until_up(http: aiohttp.ClientSession, base: str) -> None:
    for _ in range(200):
        try:
            async with http.get(f"{base}/api/v2/otaList") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("daemon did not come up")
