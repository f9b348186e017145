"""The overview as an operator sees it: devices and online per product, the versions in the fleet,
upgrades by state, live campaigns."""

from __future__ import annotations

import re

from tests.dashboard import log_in
from tests.helpers import campaign_body, register_fleet
from tests.test_web_devices import connected, rows
from tests.test_lifecycle import _report


def _product_row(page: str, product: int) -> tuple[str, str]:
    found = re.search(rf'<tr data-product="{product}">.*?data-field="devices">(\d+)<.*?data-field="online">(\d+)<',
                      page, re.S)
    assert found, f"no row for product {product}"
    return found.group(1), found.group(2)


async def test_the_overview_counts_the_fleet_and_links_into_it(otad):
    passwords = await register_fleet(otad, 5, product_id=7)
    await otad.add_device("camera-1", 8)
    assert (await otad.upload("fw", 7, b"image"))[0] == 200
    device = await connected(otad, "gw-001", passwords["gw-001"])
    _, body = await otad.enable("fw", "gw-001")
    version = body["data"][0]["version"]
    assert (await _report(device, "gw-001", version=version, status="updated", currentVersion="2.0.0"))["accepted"]
    await otad.enable("fw", "gw-002")  # left notified
    status, body = await otad.request("POST", "/api/v2/campaigns", json=campaign_body(name="fw", stages=[100]))
    assert status == 200, body
    client = await log_in(otad)
    try:
        status, page = await client.get("/")
        assert status == 200
        assert _product_row(page, 7) == ("5", "1") and _product_row(page, 8) == ("1", "0")
        assert '<span class="big" data-summary="devices">6</span>' in page
        assert '<span class="big" data-summary="online">1</span>' in page
        assert re.search(r'upgrades\.updated">1<', page)
        # the version chart: 2.0.0 on one device, the rest never reported, each a link to those devices
        assert '<a href="/devices?product=7&amp;version=2.0.0">2.0.0</a>' in page
        assert 'value="1" aria-label="1 devices"' in page
        _, listed = await client.get("/devices?product=7&unreported=1")
        assert rows(listed) == ["gw-000", "gw-002", "gw-003", "gw-004"]
        # the live campaign with its progress bar
        assert re.search(r'data-campaign="\d+"', page) and "<progress" in page
    finally:
        await device.close()
        await client.close()
