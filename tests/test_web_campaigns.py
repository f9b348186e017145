"""The Campaigns pages: start a campaign from the form, watch its stages, pause, resume and cancel
it; the service's own message for a bad field; a viewer who reads but changes nothing; the live
feed telling open pages when a campaign is paused."""

from __future__ import annotations

import asyncio
import json

from otad.service.campaigns import stage_of
from tests.dashboard import log_in
from tests.helpers import campaign_body, get_campaign, register_fleet

DEVICES = 12
STAGES = [50, 100]
FORM = {"stages": "50, 100", "successThreshold": "0.95", "failureThreshold": "0.05", "maxConcurrent": "100",
        "notifyRate": "500", "timeout": ""}


async def _fleet_and_package(otad) -> tuple[int, int]:
    """Devices of product 7 that never connect (their upgrades stay notified) and package fw-2.0;
    (package id, devices in the first stage)."""
    await register_fleet(otad, DEVICES)
    status, body = await otad.upload("fw-2.0", 7, b"new firmware", version="2.0")
    assert status == 200, body
    first = sum(stage_of(7, "fw-2.0", f"gw-{i:03d}", STAGES) == 0 for i in range(DEVICES))
    assert 0 < first < DEVICES
    return body["data"]["id"], first


async def _settled(otad, campaign_id: int, notified: int) -> dict:
    """The campaign once its first stage's devices are all told (nothing moves after that)."""
    async with asyncio.timeout(10):
        while (campaign := await get_campaign(otad, campaign_id))["states"].get("notified", 0) < notified:
            await asyncio.sleep(0.1)
    return campaign


async def _running_campaign(otad) -> tuple[int, int, int]:
    """A campaign started by the API whose first stage is all told; (package id, campaign id,
    devices in the first stage)."""
    package_id, first = await _fleet_and_package(otad)
    status, body = await otad.request("POST", "/api/v2/campaigns", json=campaign_body(stages=STAGES))
    assert status == 200, body
    await _settled(otad, body["data"]["id"], first)
    return package_id, body["data"]["id"], first


async def test_an_admin_starts_a_campaign_from_the_form_and_sees_its_stages(otad):
    package_id, first = await _fleet_and_package(otad)
    client = await log_in(otad)
    try:
        status, page = await client.get("/campaigns")
        assert status == 200 and "No campaign yet" in page
        assert f'<option value="{package_id}"' in page and "fw-2.0 (product 7, version 2.0)" in page
        assert "cumulative" in page and "commands per second" in page and "(seconds)" in page
        status, _, location = await client.post("/campaigns", {"package": str(package_id), **FORM})
        assert status == 303 and location.endswith("?done=created")
        campaign_id = int(location.split("/")[-1].split("?")[0])
        campaign = await _settled(otad, campaign_id, first)
        # the form built the API's body: the typed stages and rate, the daemon's timeout by default
        assert (campaign["name"], campaign["productId"], campaign["stages"]) == ("fw-2.0", 7, STAGES)
        assert campaign["notifyRate"] == 500 and campaign["timeout"] == otad.settings.upgrade.timeout

        status, page = await client.get(location)
        assert status == 200 and "The campaign is created" in page
        assert f'data-campaign="{campaign_id}"' in page and "stage <span data-field=\"stage\">1</span> of 2" in page
        assert f'<td class="num" data-stage-devices>{first}</td>' in page
        assert f'<td class="num" data-stage-devices>{DEVICES - first}</td>' in page
        assert f'<td class="num" data-campaign-state="notified">{first}</td>' in page
        assert "pauses at more than 5% failures" in page and "at 95% success or more" in page
        assert f'href="/upgrades?campaign={campaign_id}"' in page
        assert f"0 of {DEVICES} updated" in page

        status, page = await client.get("/campaigns")
        assert f'<a href="/campaigns/{campaign_id}">#{campaign_id}</a>' in page and "running" in page
    finally:
        await client.close()


async def test_pause_resume_and_cancel_from_the_campaign_page(otad):
    _, campaign_id, first = await _running_campaign(otad)
    page_path = f"/campaigns/{campaign_id}"
    client = await log_in(otad)
    try:
        status, page = await client.get(page_path)
        assert f'action="{page_path}/pause"' in page and "/resume" not in page
        assert 'data-confirm="Cancel campaign' in page

        status, _, location = await client.post(f"{page_path}/pause", {}, csrf_from=page_path)
        assert (status, location) == (303, f"{page_path}?done=paused")
        assert (await get_campaign(otad, campaign_id))["state"] == "paused"
        status, page = await client.get(location)
        assert "The campaign is paused" in page and "paused by an admin" in page
        assert f'action="{page_path}/resume"' in page and f'action="{page_path}/pause"' not in page

        status, _, location = await client.post(f"{page_path}/resume", {}, csrf_from=page_path)
        assert (status, location) == (303, f"{page_path}?done=resumed")
        assert (await get_campaign(otad, campaign_id))["state"] == "running"

        status, _, location = await client.post(f"{page_path}/cancel", {}, csrf_from=page_path)
        assert (status, location) == (303, f"{page_path}?done=cancelled")
        campaign = await get_campaign(otad, campaign_id)
        assert campaign["state"] == "cancelled" and campaign["states"] == {"cancelled": first}
        status, page = await client.get(location)
        assert "cancelled by an admin" in page and f"{page_path}/cancel" not in page  # nothing left to do
        # a second cancel is the service's refusal, shown as a page
        status, page, _ = await client.post(f"{page_path}/cancel", {}, csrf_from=page_path)
        assert status == 409 and f"campaign {campaign_id} is cancelled" in page
    finally:
        await client.close()


async def test_a_bad_field_shows_the_services_message_keeps_the_form_and_creates_nothing(otad):
    package_id, _ = await _fleet_and_package(otad)
    client = await log_in(otad)
    try:
        status, page, _ = await client.post("/campaigns", {**FORM, "package": str(package_id), "stages": "10, 5"})
        assert status == 400 and "stages must be rising cumulative percentages" in page
        assert 'value="10, 5"' in page and f'<option value="{package_id}" selected>' in page
        status, page, _ = await client.post("/campaigns", {**FORM, "package": str(package_id), "failureThreshold": "5%"})
        assert status == 400 and "failureThreshold must be a number from 0 to 1" in page and 'value="5%"' in page
        status, page, _ = await client.post("/campaigns", {**FORM, "package": ""}, csrf_from="/campaigns")
        assert status == 400 and "choose the package" in page
        status, body = await otad.request("GET", "/api/v2/campaigns")
        assert body["data"] == []
    finally:
        await client.close()


async def test_a_viewer_sees_the_campaign_pages_but_changes_nothing(otad):
    package_id, campaign_id, first = await _running_campaign(otad)
    viewer = await log_in(otad, "vera", role="viewer")
    try:
        status, page = await viewer.get("/campaigns")
        assert status == 200 and f'href="/campaigns/{campaign_id}"' in page and "Start a campaign" not in page
        status, page = await viewer.get(f"/campaigns/{campaign_id}")
        assert status == 200 and "data-stage-devices" in page and "/pause" not in page and "/cancel" not in page
        for action in ("pause", "cancel"):
            status, _, _ = await viewer.post(f"/campaigns/{campaign_id}/{action}", {}, csrf_from="/campaigns")
            assert status == 403
        status, _, _ = await viewer.post("/campaigns", {"package": str(package_id), **FORM, "stages": "100"},
                                         csrf_from="/campaigns")
        assert status == 403
        assert (await get_campaign(otad, campaign_id))["state"] == "running"
        assert len((await otad.request("GET", "/api/v2/campaigns"))[1]["data"]) == 1
    finally:
        await viewer.close()


async def test_an_open_page_hears_that_the_campaign_was_paused(otad):
    _, campaign_id, first = await _running_campaign(otad)  # no upgrade moves from here on: only the pause speaks
    client = await log_in(otad)
    try:
        async with client.session.get(otad.url + "/events") as stream:
            assert stream.status == 200
            await client.post(f"/campaigns/{campaign_id}/pause", {}, csrf_from=f"/campaigns/{campaign_id}")
            async with asyncio.timeout(5):
                while True:
                    line = (await stream.content.readline()).decode()
                    assert line, "the stream ended"
                    if line.startswith("data: "):
                        progress = json.loads(line[len("data: "):]).get("campaigns", {}).get(str(campaign_id))
                        if progress is not None:
                            break
            assert progress["state"] == "paused" and progress["stages"][0]["devices"] == first
    finally:
        await client.close()


async def test_stage_counts_follow_devices_that_join_and_leave(otad):
    _, campaign_id, first = await _running_campaign(otad)

    async def devices() -> int:
        return sum(stage["devices"] for stage in (await get_campaign(otad, campaign_id))["stageProgress"])

    assert await devices() == DEVICES
    await otad.add_device("late-1", 7)
    await otad.add_device("other-product", 8)
    assert await devices() == DEVICES + 1
    status, _ = await otad.request("DELETE", "/api/v2/devices", params={"deviceName": "gw-000"})
    assert status == 200
    assert await devices() == DEVICES
