"""The Devices pages as an operator sees them: search, filters and pages of the fleet; a device's
inventory, open upgrade and history with each timeline; enable, pin and delete from the page;
accepting a waiting xiaozhi board by its code; a viewer who sees all and changes nothing."""

from __future__ import annotations

import re

import pytest

from tests.dashboard import log_in
from tests.helpers import register_fleet
from tests.test_lifecycle import COMMAND, REPLY, _report
from tests.test_xiaozhi import MAC, check
from tests.test_xiaozhi_activation import enrolling_daemon

_ROW = re.compile(r'<tr data-device="([^"]+)">')


def rows(page: str) -> list[str]:
    """The device names of the table's rows, in order."""
    return _ROW.findall(page)


async def upgrades_of(otad, device_name: str) -> list[dict]:
    status, body = await otad.request("GET", "/api/v2/upgrades", params={"deviceName": device_name})
    assert status == 200, body
    return body["data"]["items"] if isinstance(body["data"], dict) else body["data"]


async def connected(otad, name: str, password: str):
    """A real MQTT device that listens for its command and report replies."""
    device = otad.device(name, password)
    assert await device.connect() == 0
    assert await device.subscribe(COMMAND.format(name)) == [1]
    assert await device.subscribe(REPLY.format(name)) == [1]
    return device


@pytest.fixture
async def enrolling(tmp_path):
    async with enrolling_daemon(tmp_path / "data") as instance:
        yield instance


async def test_search_filters_and_pages_of_a_fleet_of_120(otad):
    passwords = await register_fleet(otad, 120, product_id=7)
    await otad.add_device("camera-1", 8)
    await otad.upload("fw", 7, b"image")
    # gw-042 connects, is told an upgrade and reports it done on 2.0.0: online, and on a version.
    device = await connected(otad, "gw-042", passwords["gw-042"])
    _, body = await otad.enable("fw", "gw-042")
    version = body["data"][0]["version"]
    assert (await _report(device, "gw-042", version=version, status="updated", currentVersion="2.0.0"))["accepted"]
    client = await log_in(otad)
    try:
        status, page = await client.get("/devices?q=gw-11")
        assert status == 200
        assert rows(page) == [f"gw-11{i}" for i in range(10)]
        assert "10 devices found" in page and "Page 1 of 1 (10 in all)" in page

        _, page = await client.get("/devices?product=7&page=2")
        assert rows(page) == [f"gw-{i:03d}" for i in range(50, 100)]
        assert "Page 2 of 3 (120 in all)" in page
        assert 'href="/devices?product=7&amp;page=1" rel="prev"' in page
        assert 'href="/devices?product=7&amp;page=3" rel="next"' in page
        assert '<option value="7" selected>7</option>' in page

        _, page = await client.get("/devices?q=gw&pageSize=25&page=5")
        assert rows(page) == [f"gw-{i:03d}" for i in range(100, 120)] and "Page 5 of 5 (120 in all)" in page
        assert 'href="/devices?q=gw&amp;pageSize=25&amp;page=4" rel="prev"' in page

        _, page = await client.get("/devices?online=yes")
        assert rows(page) == ["gw-042"]
        assert '<span data-field="online" data-state-class class="state state-online">online</span>' in page
        _, page = await client.get("/devices?online=no&product=7")
        assert "119 devices found" in page and "gw-042" not in rows(page)

        _, page = await client.get("/devices?version=2.0.0")
        assert rows(page) == ["gw-042"] and "<td>2.0.0</td>" in page
        # The overview's chart links unreported=1 for the devices that never reported a version.
        _, page = await client.get("/devices?product=7&unreported=1")
        assert "119 devices found" in page and "gw-042" not in rows(page)
        assert 'name="unreported" type="checkbox" value="1" checked' in page
        assert "unreported=1" in page  # the pager keeps that filter
        # The form sends its blank version box: any version.
        _, page = await client.get("/devices?q=&product=7&online=any&version=")
        assert "120 devices found" in page
        _, page = await client.get("/devices?q=&product=8&online=any&version=&unreported=1")
        assert rows(page) == ["camera-1"]

        _, page = await client.get("/devices?product=99")  # a product with no device yet stays chosen
        assert rows(page) == [] and page.count('<option value="99" selected>99</option>') == 1
        _, page = await client.get("/devices?q=nothing-like-this")
        assert rows(page) == [] and "No device matches" in page and "0 devices found" in page
        status, page = await client.get("/devices?online=maybe")
        assert status == 400 and "online must be yes or no" in page
    finally:
        await client.close()
        await device.close()


async def test_device_page_shows_inventory_and_the_timeline_of_a_real_devices_report(otad):
    password = await otad.add_device("dev1", 7)
    device = await connected(otad, "dev1", password)
    await otad.upload("fw", 7, b"image", version="1.0.1")
    _, body = await otad.enable("fw", "dev1")
    version = body["data"][0]["version"]
    reply = await _report(device, "dev1", version=version, status="downloading", progress=40)
    assert reply["accepted"] is True
    client = await log_in(otad)
    try:
        status, page = await client.get("/devices/dev1")
        assert status == 200
        assert "<dt>Product</dt><dd><a href=\"/devices?product=7\">7</a></dd>" in page
        assert '<section aria-labelledby="inventory-heading" data-device="dev1">' in page
        assert '<span data-field="online" data-state-class class="state state-online">online</span>' in page
        assert "<dt>Firmware version</dt><dd>not reported</dd>" in page
        # The open upgrade, live, and the same upgrade in the history with its timeline.
        assert page.count(f'data-upgrade="{version}"') == 2
        assert f'<tr data-upgrade="{version}">' in page
        assert '<span data-field="state" data-state-class class="state state-downloading">downloading</span>' in page
        timeline = page[page.index("<details>"):page.index("</details>")]
        assert re.findall(r'class="state state-(\w+)"', timeline) == ["created", "notified", "downloading"]
        assert "<td>device</td>" in timeline and "&#34;progress&#34;:40" in timeline  # the report as sent
        assert "Page 1 of 1 (1 upgrades in all)" in page
    finally:
        await client.close()
        await device.close()


async def test_history_pages_hold_twenty_upgrades(otad):
    await otad.add_device("dev1", 7)
    await otad.upload("fw", 7, b"image")
    versions = [(await otad.enable("fw", "dev1"))[1]["data"][0]["version"] for _ in range(23)]
    client = await log_in(otad)
    try:
        _, page = await client.get("/devices/dev1?page=2")
        history = re.findall(r'<tr data-upgrade="([^"]+)">', page)
        assert history == versions[2::-1]  # newest first: page 2 holds the three oldest
        assert "Page 2 of 2 (23 upgrades in all)" in page and 'href="/devices/dev1?page=1" rel="prev"' in page
        assert page.count("<details>") == 3
        status, page = await client.get("/devices/no-such-device")
        assert status == 404 and "no device named" in page
    finally:
        await client.close()


async def test_enable_pin_and_delete_from_the_device_page(otad):
    await otad.add_device("dev1", 7)
    await otad.upload("fw", 7, b"image", version="1.0.1")
    await otad.upload("other-product", 8, b"image")
    client = await log_in(otad)
    try:
        _, page = await client.get("/devices/dev1")
        assert '<label for="enable-package">Package</label>' in page
        assert '<option value="fw">fw (1.0.1)</option>' in page
        assert "other-product" not in page  # only the device's product's packages are offered
        assert '<label for="enable-timeout">' in page and '<label for="pin-version">' in page

        status, _, location = await client.post("/devices/dev1/enable", {"package": "fw", "timeout": "600"},
                                                csrf_from="/devices/dev1")
        assert (status, location) == (303, "/devices/dev1?done=enabled")
        [upgrade] = await upgrades_of(otad, "dev1")
        assert upgrade["state"] == "notified"
        _, page = await client.get(location)
        assert "The upgrade is enabled and sent to the device." in page
        assert f'<p data-upgrade="{upgrade["version"]}">' in page  # the open upgrade
        _, page = await client.get("/devices?product=7")
        assert (f'<span data-upgrade="{upgrade["version"]}"><a class="mono" href="/upgrades/{upgrade["version"]}">'
                in page and 'class="state state-notified">notified</span>' in page)

        status, _, location = await client.post("/devices/dev1/pin", {"package": "fw", "versionName": "1.0.1",
                                                                      "description": "field fix"},
                                                csrf_from="/devices/dev1")
        assert (status, location) == (303, "/devices/dev1?done=pinned")
        status, body = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False,
                                          params={"deviceName": "dev1"})
        assert status == 200 and (body["data"]["version"], body["data"]["description"]) == ("1.0.1", "field fix")
        _, page = await client.get(location)
        assert "<dd>fw, version 1.0.1: field fix</dd>" in page

        status, page, _ = await client.post("/devices/dev1/enable", {"package": "nope"}, csrf_from="/devices/dev1")
        assert status == 404 and "has no package named" in page

        _, page = await client.get("/devices/dev1")
        assert 'data-confirm="Delete device dev1? Its upgrade history goes with it."' in page
        status, _, location = await client.post("/devices/dev1/delete", {}, csrf_from="/devices/dev1")
        assert (status, location) == (303, "/devices?done=deleted")
        _, body = await otad.request("GET", "/api/v2/devices")
        assert [d["deviceName"] for d in body["data"]] == []
        _, page = await client.get(location)
        assert "The device is deleted." in page
    finally:
        await client.close()


async def test_a_waiting_xiaozhi_board_is_accepted_by_its_code(enrolling):
    _, reply = await check(enrolling)
    code = reply["activation"]["code"]
    client = await log_in(enrolling)
    try:
        _, page = await client.get("/devices")
        waiting = page[page.index('id="pending-heading"'):]
        assert MAC in waiting and "bread-compact-wifi" in waiting and code not in page
        assert '<label for="activation-code">Activation code</label>' in page

        status, page, _ = await client.post("/devices/activate", {"code": "000000" if code != "000000" else "111111"},
                                            csrf_from="/devices")
        assert status == 404 and "no board is waiting with code" in page

        status, _, location = await client.post("/devices/activate", {"code": f"{code[:3]} {code[3:]}"})
        assert (status, location) == (303, "/devices?done=activated")
        _, body = await enrolling.request("GET", "/api/v2/devices")
        assert [(d["deviceName"], d["productId"]) for d in body["data"]] == [(MAC, 9)]
        _, page = await client.get(location)
        assert "The board is activated" in page and "No board is waiting." in page
        assert rows(page) == [MAC]
        status, page = await client.get(f"/devices/{MAC}")
        assert status == 200 and "<dt>Chip</dt><dd>esp32s3</dd>" not in page  # inventory comes with its next check
        await check(enrolling)
        _, page = await client.get(f"/devices/{MAC}")
        assert "<dt>Chip</dt><dd>esp32s3</dd>" in page and "<dt>App version</dt><dd>1.9.2</dd>" in page
    finally:
        await client.close()


async def test_a_viewer_sees_the_devices_pages_and_every_change_is_refused(enrolling):
    await enrolling.add_device("dev1", 9)
    _, reply = await check(enrolling)
    client = await log_in(enrolling, "vera", role="viewer")
    try:
        status, page = await client.get("/devices")
        assert status == 200 and rows(page) == ["dev1"] and MAC in page
        assert "Activation code" not in page and 'action="/devices/activate"' not in page
        status, page = await client.get("/devices/dev1")
        assert status == 200 and "<h1>Device <span class=\"mono\">dev1</span></h1>" in page
        assert "Enable a package" not in page and "/delete" not in page and "/pin" not in page

        for path, form in (("/devices/dev1/enable", {"package": "xiaozhi-1.9.3"}),
                           ("/devices/dev1/pin", {"package": "xiaozhi-1.9.3", "versionName": "1.9.3"}),
                           ("/devices/dev1/delete", {}),
                           ("/devices/activate", {"code": reply["activation"]["code"]})):
            status, _, _ = await client.post(path, form, csrf_from="/devices")
            assert status == 403, path
        assert await upgrades_of(enrolling, "dev1") == []
        _, body = await enrolling.request("GET", "/api/v2/otaPassive")
        assert body["data"] == []
        _, body = await enrolling.request("GET", "/api/v2/devices")
        assert [d["deviceName"] for d in body["data"]] == ["dev1"]  # not deleted, and the board not accepted
    finally:
        await client.close()
