"""The Upgrades pages as an operator sees them: the table filtered by state, campaign and device,
in pages that keep the filters; cancel from the page; one upgrade with its device's reports in
the timeline; a viewer who sees all and cancels nothing."""

from __future__ import annotations

import re

from tests.dashboard import log_in
from tests.test_lifecycle import _report, _upgrade
from tests.test_web_devices import connected

_ROW = re.compile(r'<tr data-upgrade="([^"]+)">')


def rows(page: str) -> list[str]:
    return _ROW.findall(page)


async def enabled(otad, count: int) -> list[str]:
    """``count`` devices dev0... of product 7, each told package fw; their upgrades' versions."""
    await otad.upload("fw", 7, b"image")
    versions = []
    for index in range(count):
        await otad.add_device(f"dev{index}", 7)
        status, body = await otad.enable("fw", f"dev{index}")
        assert status == 200, body
        versions.append(body["data"][0]["version"])
    return versions


async def test_the_state_filter_shows_only_those_and_the_pager_keeps_the_filters(otad):
    versions = await enabled(otad, 4)
    status, body = await otad.request("POST", f"/api/v2/upgrades/{versions[1]}/cancel")
    assert status == 200, body
    client = await log_in(otad)
    try:
        status, page = await client.get("/upgrades")
        assert status == 200 and sorted(rows(page)) == sorted(versions) and "4 upgrades found" in page
        for control in ("filter-state", "filter-campaign", "filter-device"):
            assert f'<label for="{control}">' in page
        _, page = await client.get("/upgrades?state=cancelled&campaign=&device=")
        assert rows(page) == [versions[1]] and '<option value="cancelled" selected>' in page
        assert '<span data-field="state" data-state-class class="state state-cancelled">cancelled</span>' in page
        assert "Cancel upgrade" not in page  # an ended upgrade has nothing to cancel
        _, page = await client.get("/upgrades?state=notified&pageSize=2")
        assert len(rows(page)) == 2 and versions[1] not in rows(page)
        assert "Page 1 of 2 (3 in all)" in page
        next_link = re.search(r'<a href="([^"]+)" rel="next">', page).group(1).replace("&amp;", "&")
        assert next_link == "/upgrades?state=notified&pageSize=2&page=2"
        _, second = await client.get(next_link)
        assert len(rows(second)) == 1 and "Page 2 of 2 (3 in all)" in second and 'rel="prev"' in second
        assert sorted(rows(page) + rows(second)) == sorted(v for v in versions if v != versions[1])
        _, page = await client.get("/upgrades?device=dev2")
        assert rows(page) == [versions[2]] and 'href="/devices/dev2"' in page
        status, page = await client.get("/upgrades?state=nonsense")
        assert status == 400 and "state must be one of" in page
    finally:
        await client.close()


async def test_cancel_from_the_page_ends_the_upgrade_and_returns_to_the_filtered_list(otad):
    [version, other] = await enabled(otad, 2)
    client = await log_in(otad)
    try:
        _, page = await client.get("/upgrades?state=notified")
        assert f'aria-label="Cancel upgrade {version} of dev0"' in page
        assert '<input type="hidden" name="back" value="/upgrades?state=notified">' in page
        # another site's address as the way back is refused, and nothing is cancelled
        status, page, _ = await client.post(f"/upgrades/{version}/cancel", {"back": "https://evil.example/upgrades"},
                                            csrf_from="/upgrades")
        assert status == 400 and (await _upgrade(otad, version))["state"] == "notified"
        status, _, location = await client.post(f"/upgrades/{version}/cancel", {"back": "/upgrades?state=notified"},
                                                csrf_from="/upgrades")
        assert (status, location) == (303, "/upgrades?state=notified&done=cancelled")
        assert (await _upgrade(otad, version))["state"] == "cancelled"
        assert (await _upgrade(otad, other))["state"] == "notified"
        _, page = await client.get(location)
        assert "The upgrade is cancelled" in page and rows(page) == [other]
        # a second cancel (a stale page) says the upgrade has ended
        status, page, _ = await client.post(f"/upgrades/{version}/cancel", {"back": f"/upgrades/{version}"},
                                            csrf_from="/upgrades")
        assert status == 409 and "has already ended (cancelled)" in page
    finally:
        await client.close()


async def test_the_upgrade_page_shows_its_fields_and_the_devices_reports_in_the_timeline(otad):
    password = await otad.add_device("dev1", 7)
    device = await connected(otad, "dev1", password)
    await otad.upload("fw", 7, b"image")
    _, body = await otad.enable("fw", "dev1")
    version = body["data"][0]["version"]
    for _ in range(3):  # the same status three times: one entry, x3
        assert (await _report(device, "dev1", version=version, status="downloading", progress=40))["accepted"]
    assert (await _report(device, "dev1", version=version, status="updating", progress=90))["accepted"]
    client = await log_in(otad)
    try:
        status, page = await client.get(f"/upgrades/{version}")
        assert status == 200 and f'<section aria-labelledby="upgrade-heading" data-upgrade="{version}">' in page
        assert '<span data-field="state" data-state-class class="state state-updating">updating</span>' in page
        assert '<dt>Device</dt><dd><a href="/devices/dev1">dev1</a></dd>' in page
        assert "<dt>Progress</dt><dd>90%</dd>" in page and "none (enabled by hand)" in page
        timeline = page[page.index('<table class="timeline">'):page.index("</table>")]
        assert re.findall(r'class="state state-(\w+)"', timeline) == ["created", "notified", "downloading", "updating"]
        assert "<td>device</td>" in timeline and "&#34;progress&#34;:40" in timeline
        counts = re.findall(r'<td class="num">x(\d+)</td>', timeline)
        assert counts == ["1", "1", "3", "1"]
        assert "Page 1 of 1 (4 entries in all)" in page
        assert "Cancel this upgrade" in page
        status, _, location = await client.post(f"/upgrades/{version}/cancel", {"back": f"/upgrades/{version}"},
                                                csrf_from=f"/upgrades/{version}")
        assert (status, location) == (303, f"/upgrades/{version}?done=cancelled")
        _, page = await client.get(location)
        assert "The upgrade is cancelled" in page and "Cancel this upgrade" not in page
        assert re.findall(r'class="state state-(\w+)"', page)[-1] == "cancelled"  # the timeline's last entry
        status, page = await client.get("/upgrades/00000000-0000-0000-0000-000000000000")
        assert status == 404 and "no upgrade" in page
    finally:
        await client.close()
        await device.close()


async def test_a_viewer_sees_the_upgrades_and_cancels_nothing(otad):
    [version] = await enabled(otad, 1)
    viewer = await log_in(otad, "vera", role="viewer")
    try:
        status, page = await viewer.get("/upgrades")
        assert status == 200 and rows(page) == [version] and "Cancel" not in page
        status, page = await viewer.get(f"/upgrades/{version}")
        assert status == 200 and "Cancel this upgrade" not in page
        status, _, _ = await viewer.post(f"/upgrades/{version}/cancel", {"back": "/upgrades"}, csrf_from="/upgrades")
        assert status == 403
        assert (await _upgrade(otad, version))["state"] == "notified"
    finally:
        await viewer.close()
