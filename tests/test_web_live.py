"""The dashboard's live stream (GET /events): one stream a page, changes summed up once a second,
closed when the daemon stops."""

from __future__ import annotations

import asyncio
import json

from tests.dashboard import log_in

REPORT = "/oc/devices/{}/sys/ota/report"


async def _next_data(response, timeout: float = 5.0) -> dict:
    """The next ``data:`` message of the stream (comments and keep-alives skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            line = (await response.content.readline()).decode()
            assert line, "the stream ended"
            if line.startswith("data: "):
                return json.loads(line[len("data: "):])


async def _until(response, predicate, timeout: float = 5.0) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            message = await _next_data(response, timeout)
            if predicate(message):
                return message


async def test_a_device_connecting_and_its_report_reach_an_open_page(otad):
    password = await otad.add_device("dev1", 1)
    assert (await otad.upload("fw", 1, b"image"))[0] == 200
    client = await log_in(otad)
    device = otad.device("dev1", password)
    try:
        async with client.session.get(otad.url + "/events") as stream:
            assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
            assert await device.connect() == 0
            message = await _until(stream, lambda m: m.get("devices", {}).get("dev1") is True)
            assert message["summary"]["online"] == 1 and message["summary"]["devices"] == 1

            status, body = await otad.enable("fw", "dev1")
            version = body["data"][0]["version"]
            await _until(stream, lambda m: m.get("upgrades", {}).get(version, {}).get("state") == "notified")
            await device.publish(REPORT.format("dev1"), json.dumps({"version": version, "status": "downloading"}).encode())
            message = await _until(stream, lambda m: m.get("upgrades", {}).get(version, {}).get("state") == "downloading")
            assert message["upgrades"][version]["device"] == "dev1"
            assert message["summary"]["upgrades"]["downloading"] == 1

            await device.close()
            await _until(stream, lambda m: m.get("devices", {}).get("dev1") is False)
    finally:
        await device.close()
        await client.close()


async def test_stopping_the_daemon_ends_open_streams_at_once(otad):
    client = await log_in(otad)
    try:
        async with client.session.get(otad.url + "/events") as stream:
            assert stream.status == 200
            # Without the feed closing them, the stop would wait http.shutdown_timeout (10 s) for
            # this request; the bound here is a hang check, well under it.
            await asyncio.wait_for(otad.daemon.stop(), 5)
            async with asyncio.timeout(5):
                while await stream.content.readline():
                    pass
    finally:
        await client.close()
