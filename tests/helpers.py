"""Helpers that several test modules share: envelope checks, campaign steps, a daemon subprocess."""

from __future__ import annotations

import asyncio
import subprocess
import sys

ENVELOPE_KEYS = ["success", "errorCode", "errorMsg", "data"]
FLEET = 200


def assert_error(status: int, body: dict, want_status: int, want_code: int) -> None:
    assert list(body) == ENVELOPE_KEYS
    assert (status, body["success"], body["errorCode"], body["data"]) == (want_status, False, want_code, None), body
    assert body["errorMsg"] and "Traceback" not in body["errorMsg"]


def assert_nothing_stored(otad) -> None:
    assert otad.db_rows("package") == 0
    assert otad.firmware_files() == []  # neither stored files nor partial uploads in .incoming


async def register_fleet(otad, count: int = FLEET, product_id: int = 7) -> dict[str, str]:
    """``count`` devices ``gw-000``... of ``product_id``; their MQTT passwords by name."""
    status, body = await otad.request("POST", "/api/v2/devices",
                                      json=[{"deviceName": f"gw-{i:03d}", "productId": product_id}
                                            for i in range(count)])
    assert status == 200
    return {entry["deviceName"]: entry["password"] for entry in body["data"]}


async def get_campaign(otad, campaign_id: int) -> dict:
    status, body = await otad.request("GET", f"/api/v2/campaigns/{campaign_id}")
    assert status == 200, body
    return body["data"]


async def wait_for_campaign(otad, campaign_id: int, states: set[str], timeout: float = 40.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        campaign = await get_campaign(otad, campaign_id)
        if campaign["state"] in states:
            return campaign
        assert asyncio.get_running_loop().time() < deadline, campaign
        await asyncio.sleep(0.2)


def campaign_body(**overrides) -> dict:
    return {"name": "fw-2.0", "productId": 7, "stages": [1, 10, 50, 100], "successThreshold": 0.95,
            "failureThreshold": 0.05, "maxConcurrent": 100, "notifyRate": 500, **overrides}


def serve(data_dir, http_port: int, mqtt_port: int, *extra: str) -> subprocess.Popen:
    """``otad serve`` as a subprocess on 127.0.0.1."""
    return subprocess.Popen(
        [sys.executable, "-m", "otad", "serve", "--data-dir", str(data_dir), "--http-host", "127.0.0.1",
         "--http-port", str(http_port), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            assert loop.time() < deadline, "daemon did not start listening"
            await asyncio.sleep(0.1)
