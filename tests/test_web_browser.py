"""The dashboard through a real browser (headless chromium, tests/browser.py): each test is an
operator's story, with the page's own script, forms and live updates, and no request leaving the
gateway."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re

import pytest
from aiohttp import web
from playwright.async_api import expect

from tests.browser import browser, otad, tab  # noqa: F401 (fixtures)
from tests.conftest import free_port
from tests.helpers import register_fleet
from tests.simulated_devices import start_fleet, stop_fleet

pytestmark = pytest.mark.asyncio(loop_scope="module")

COMMAND = "/oc/devices/{}/sys/ota"
REPORT = "/oc/devices/{}/sys/ota/report"
LIVE = 2_000  # ms: issue 12 asks for a change on screen within 2 s, without a reload


async def _enable(otad, package: str, device: str) -> str:
    status, body = await otad.enable(package, device)
    assert status == 200, body
    return body["data"][0]["version"]


async def _report(device, name: str, **report) -> None:
    await device.publish(REPORT.format(name), json.dumps(report).encode())


async def test_log_in_see_the_fleet_and_log_out(otad, tab):
    await otad.add_device("gw-1", 7)
    await otad.add_device("gw-2", 7)
    await otad.add_device("cam-1", 9)
    page = tab.page

    await tab.goto("/")  # nothing about the fleet before login: the form
    await expect(page).to_have_url(tab.url("/login?next=/"))
    await expect(page.get_by_role("heading", name="Log in to otad")).to_be_visible()

    await tab.log_in(otad)
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    await expect(page.locator('[data-summary="devices"]')).to_have_text("3")
    products = page.get_by_role("table").filter(has_text="Product").first
    await expect(products.locator('[data-product="7"] [data-field="devices"]')).to_have_text("2")
    await expect(products.locator('[data-product="9"] [data-field="devices"]')).to_have_text("1")
    await expect(page.locator("#live-status")).to_have_text("live", timeout=LIVE)
    await expect(page.get_by_text("adam (admin)")).to_be_visible()

    await page.get_by_role("button", name="Log out").click()
    await expect(page).to_have_url(tab.url("/login"))
    await tab.goto("/devices")  # the session is gone: back to the form
    await expect(page.get_by_role("button", name="Log in")).to_be_visible()


async def test_the_overview_counts_follow_a_device_live(otad, tab):
    password = await otad.add_device("gw-1", 7)
    assert (await otad.upload("fw", 7, b"image"))[0] == 200
    page = tab.page
    await tab.log_in(otad)
    await expect(page.locator("#live-status")).to_have_text("live", timeout=LIVE)
    await tab.mark()
    online = page.locator('.cards [data-summary="online"]')
    await expect(online).to_have_text("0")

    device = otad.device("gw-1", password)
    try:
        assert await device.connect() == 0
        await expect(online).to_have_text("1", timeout=LIVE)
        await expect(page.locator('[data-product="7"] [data-field="online"]')).to_have_text("1", timeout=LIVE)

        version = await _enable(otad, "fw", "gw-1")
        await expect(page.locator('.cards [data-summary="upgrades.notified"]')).to_have_text("1", timeout=LIVE)
        await _report(device, "gw-1", version=version, status="updated", currentVersion="2.0.0")
        await expect(page.locator('.cards [data-summary="upgrades.updated"]')).to_have_text("1", timeout=LIVE)
        await expect(page.locator('.cards [data-summary="upgrades.notified"]')).to_have_text("0")
    finally:
        await device.close()
    await expect(online).to_have_text("0", timeout=LIVE)
    assert await tab.still_marked(), "the page was reloaded or left: the changes did not arrive live"


async def test_a_real_device_reporting_shows_live_on_its_page(otad, tab):
    password = await otad.add_device("gw-1", 7)
    assert (await otad.upload("fw", 7, b"image"))[0] == 200
    version = await _enable(otad, "fw", "gw-1")
    page = tab.page
    await tab.log_in(otad)
    await tab.goto("/devices/gw-1")
    await expect(page.locator("#live-status")).to_have_text("live", timeout=LIVE)
    await tab.mark()
    presence = page.locator('[data-device="gw-1"] [data-field="online"]')
    open_state = page.get_by_role("region", name="Open upgrade").locator(f'[data-upgrade="{version}"] [data-field="state"]')
    history_state = page.get_by_role("region", name="Upgrade history").locator(f'[data-upgrade="{version}"] [data-field="state"]')
    await expect(presence).to_have_text("offline")
    await expect(open_state).to_have_text("notified")

    device = otad.device("gw-1", password)
    try:
        assert await device.connect() == 0
        await expect(presence).to_have_text("online", timeout=LIVE)
        await expect(presence).to_have_class("state state-online")
        await _report(device, "gw-1", version=version, status="downloading", progress=10)
        await expect(open_state).to_have_text("downloading", timeout=LIVE)
        await expect(history_state).to_have_text("downloading")
        await _report(device, "gw-1", version=version, status="updated", currentVersion="2.0.0")
        await expect(open_state).to_have_text("updated", timeout=LIVE)
        await expect(open_state).to_have_class("state state-updated")
        await expect(history_state).to_have_text("updated")
    finally:
        await device.close()
    await expect(presence).to_have_text("offline", timeout=LIVE)
    assert await tab.still_marked(), "the page was reloaded or left: the changes did not arrive live"


async def _enable_from_the_device_page(tab, device: str, package: str) -> str:
    """Enable ``package`` for ``device`` with its page's form; return the new upgrade's version."""
    page = tab.page
    await tab.goto(f"/devices/{device}")
    form = page.get_by_role("form", name="Enable a package")
    await form.get_by_label("Package").select_option(package)
    await form.get_by_role("button", name="Enable").click()
    await expect(page.get_by_role("status").filter(has_text="The upgrade is enabled")).to_be_visible()
    opened = page.get_by_role("region", name="Open upgrade").locator("[data-upgrade]")
    await expect(opened.locator('[data-field="state"]')).to_have_text("notified")
    return await opened.get_attribute("data-upgrade")


# Kept in sessionStorage, so it survives the navigation the upload ends with: what the upload
# form's progress bar and status showed while the file was being sent.
WATCH_UPLOAD = """() => {
    const bar = document.querySelector("[data-upload-progress]");
    const status = document.querySelector("[data-upload-status]");
    new MutationObserver(() => {
        if (!bar.hidden) sessionStorage.setItem("bar", "shown");
        if (status.textContent) sessionStorage.setItem("status", status.textContent);
    }).observe(document.querySelector("form[data-upload]"), {subtree: true, attributes: true,
                                                              childList: true, characterData: true});
}"""
FIRMWARE = os.urandom(3_000_000)


async def test_upload_a_package_through_the_page_enable_and_pin_it(otad, tab, tmp_path):
    firmware = tmp_path / "gw-2.1.bin"  # a path, not a buffer: the browser reads it, nothing is piped
    firmware.write_bytes(FIRMWARE)
    password = await otad.add_device("gw-1", 7)
    page = tab.page
    await tab.log_in(otad)
    await tab.goto("/packages")
    upload = page.get_by_role("form", name="Upload a package")
    await upload.get_by_label("Name").fill("gw-fw-2.1")
    await upload.get_by_label("Product id").fill("7")
    await upload.get_by_label("Version (optional)").fill("2.1.0")
    await upload.get_by_label("Firmware file").set_input_files(firmware)
    await page.evaluate(WATCH_UPLOAD)
    await upload.get_by_role("button", name="Upload").click()

    await expect(page.get_by_role("status").filter(has_text="The package is uploaded")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('bar')") == "shown"
    assert (await page.evaluate("sessionStorage.getItem('status')")).startswith("Uploading")
    row = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="gw-fw-2.1"))
    await expect(row).to_contain_text(hashlib.md5(FIRMWARE).hexdigest())
    await expect(row).to_contain_text("2.1.0")
    [stored] = await otad.daemon.services.packages.list()
    assert (stored.name, stored.product_id, stored.size) == ("gw-fw-2.1", 7, len(FIRMWARE))

    device = otad.device("gw-1", password)
    try:
        assert await device.connect() == 0
        assert await device.subscribe(COMMAND.format("gw-1")) == [1]
        version = await _enable_from_the_device_page(tab, "gw-1", "gw-fw-2.1")
        command = json.loads((await device.next_message()).payload)
        assert (command["version"], command["md5"]) == (version, hashlib.md5(FIRMWARE).hexdigest())
    finally:
        await device.close()

    pin = page.get_by_role("form", name="Pin a passive package")
    await pin.get_by_label("Version name").fill("2.1.0")
    await pin.get_by_role("button", name="Pin").click()
    await expect(page.get_by_role("status").filter(has_text="The passive package is pinned")).to_be_visible()
    await expect(page.get_by_role("region", name="Inventory")).to_contain_text("gw-fw-2.1, version 2.1.0")

    # The pin still uses the package: deleting it (after the confirmation) says so plainly.
    await tab.goto("/packages")
    await page.get_by_role("button", name="Delete package gw-fw-2.1 of product 7").click()
    await expect(page.get_by_role("alert")).to_contain_text("used by")
    assert len(await otad.daemon.services.packages.list()) == 1


async def _campaign_action(page, box, button: str, state: str) -> None:
    """Press a campaign page's button and wait for the page that shows the new state.

    Not the notice (``?done=...``): the state change reaches the open page's live stream at once,
    and its script reloads the page it is on, which can win over the form's own redirect; then
    the new state is shown without the notice."""
    await page.get_by_role("button", name=button).click()
    await expect(box.locator('[data-field="state"]')).to_have_text(state)
    await page.wait_for_load_state()


async def test_run_a_campaign_from_the_page_watch_it_and_pause_resume_cancel_it(otad, tab):
    passwords = await register_fleet(otad, 20, product_id=7)
    assert (await otad.upload("fw-2.0", 7, b"new firmware", version="2.0.0"))[0] == 200
    fleet = await start_fleet(otad.mqtt_port, passwords, fails=lambda name: False)
    page = tab.page
    try:
        await tab.log_in(otad)
        await tab.goto("/campaigns")
        form = page.get_by_role("form", name="Start a campaign")
        await form.get_by_label("Package", exact=True).select_option(label="fw-2.0 (product 7, version 2.0.0)")
        await form.get_by_label(re.compile("^Stages")).fill("50, 100")
        await form.get_by_label(re.compile("^Success threshold")).fill("0.9")
        await form.get_by_label(re.compile("^Failure threshold")).fill("0.5")
        await form.get_by_label(re.compile("^Max concurrent")).fill("5")
        await form.get_by_label(re.compile("^Notify rate")).fill("2")  # slow enough to watch, and to pause half-way
        await form.get_by_role("button", name="Start campaign").click()
        await expect(page.get_by_role("status").filter(has_text="The campaign is created")).to_be_visible()
        [campaign] = await otad.daemon.services.campaigns.list()
        assert (campaign.stages, campaign.max_concurrent, campaign.notify_rate) == ([50, 100], 5, 2)
        box = page.locator(f'[data-campaign="{campaign.id}"]')
        await expect(box.locator('[data-field="state"]')).to_have_text("running")

        # The devices update one by one: the progress moves on screen, without a reload.
        await tab.mark()
        progress = box.locator('[data-field="progress-text"]')
        before = await progress.inner_text()
        # A device is told every half second, then reports, then the next live message: 2 s at most
        # for the change to reach the screen once it happened.
        await expect(progress).not_to_have_text(before, timeout=LIVE + 1_000)
        await expect(progress).to_have_text(re.compile(r"[1-9][0-9]* of 20 updated"))
        await expect(box.locator('[data-stage="1"] [data-stage-state="updated"]')).not_to_have_text("0")
        assert await tab.still_marked(), "the campaign's progress did not arrive live"

        await _campaign_action(page, box, f"Pause campaign {campaign.id}", "paused")
        assert (await otad.daemon.services.campaigns.get(campaign.id)).state == "paused"
        told = sum(len(device.commands) for device in fleet)
        assert told < 20, "the campaign reached every device before the pause"
        await asyncio.sleep(1.5)  # paused: nobody else is told
        assert sum(len(device.commands) for device in fleet) == told

        await _campaign_action(page, box, f"Resume campaign {campaign.id}", "running")
        await _campaign_action(page, box, f"Cancel campaign {campaign.id}", "cancelled")  # confirm() accepted
        await expect(page.get_by_role("button", name=f"Resume campaign {campaign.id}")).to_have_count(0)
        assert (await otad.daemon.services.campaigns.get(campaign.id)).state == "cancelled"
    finally:
        await stop_fleet(fleet)


async def test_a_viewer_sees_everything_and_can_change_nothing(otad, tab):
    await otad.add_device("gw-1", 7)
    _, body = await otad.upload("fw", 7, b"image")
    package_id = body["data"]["id"]
    version = await _enable(otad, "fw", "gw-1")
    await otad.add_device("cam-1", 8)  # the campaign's product: gw-1's upgrade stays as it is
    assert (await otad.upload("cam-fw", 8, b"camera image"))[0] == 200
    status, body = await otad.request("POST", "/api/v2/campaigns", json={"name": "cam-fw", "productId": 8,
                                                                         "stages": [100]})
    assert status == 200, body
    campaign = body["data"]["id"]
    page = tab.page
    await tab.log_in(otad, "vera", role="viewer")
    await expect(page.get_by_text("vera (viewer)")).to_be_visible()

    # Every page is there to read, without one control that changes the fleet.
    for path, shown in (("/packages", page.get_by_role("rowheader", name="fw", exact=True)),
                        ("/devices", page.locator('[data-device="gw-1"]')),
                        ("/devices/gw-1", page.get_by_role("heading", name="Inventory")),
                        ("/upgrades", page.locator(f'[data-upgrade="{version}"]').first),
                        (f"/upgrades/{version}", page.get_by_role("heading", name="Timeline")),
                        ("/campaigns", page.get_by_role("link", name=f"#{campaign}")),
                        (f"/campaigns/{campaign}", page.get_by_role("heading", name="Stages"))):
        await tab.goto(path)
        await expect(shown).to_be_visible()
        buttons = await page.get_by_role("main").get_by_role("button").all_inner_texts()
        assert set(buttons) <= {"Search", "Filter"}, f"{path} shows a viewer {buttons}"
        await expect(page.get_by_role("textbox", name="Activation code")).to_have_count(0)

    # The page's own script forges the admin's forms: without the CSRF token, and with the token
    # the viewer's session does have (its logout form carries it). Both are refused.
    token = await page.locator('form[action="/logout"] input[name="csrf"]').input_value()
    for action, fields in (("/devices/gw-1/delete", {}), ("/devices/gw-1/enable", {"package": "fw"}),
                           (f"/upgrades/{version}/cancel", {}), (f"/packages/{package_id}/delete", {}),
                           (f"/campaigns/{campaign}/pause", {}),
                           ("/campaigns", {"package": str(package_id), "stages": "100"})):
        assert await tab.post_without_token(action, fields) == 403, action
        assert await tab.post_without_token(action, {**fields, "csrf": token}) == 403, action
    assert await otad.daemon.services.devices.is_registered("gw-1")
    assert len(await otad.daemon.services.packages.list()) == 2
    assert [(c.id, c.state) for c in await otad.daemon.services.campaigns.list()] == [(campaign, "running")]
    status, body = await otad.request("GET", "/api/v2/upgrades", params={"deviceName": "gw-1"})
    assert [(u["version"], u["state"]) for u in body["data"]["items"]] == [(version, "notified")]


async def _hostile_site(target: str, fields: dict[str, str]):
    """Another site (a second server on another 127.0.0.1 port) whose page posts a form to
    ``target`` as soon as it loads. Returns (runner, its URL)."""
    inputs = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
    html = (f'<!doctype html><title>cute cats</title><form id="f" method="post" action="{target}">{inputs}</form>'
            '<script>document.getElementById("f").submit()</script>')

    async def cats(request: web.Request) -> web.Response:
        return web.Response(text=html, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", cats)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("action", ["/devices/gw-1/delete", "/logout"])
async def test_a_form_posted_from_another_site_is_refused_and_changes_nothing(otad, tab, action):
    await otad.add_device("gw-1", 7)
    page = tab.page
    await tab.log_in(otad)
    # Same host, another port: the same *site* to the browser, so the SameSite=Strict cookie does
    # go along; what refuses the form is its Origin and the missing CSRF token.
    runner, hostile = await _hostile_site(otad.url + action, {"confirm": "gw-1", "csrf": "guessed"})
    try:
        async with page.expect_response(lambda r: r.url == otad.url + action) as refused:
            await page.goto(hostile)
        assert (await refused.value).status == 403
    finally:
        await runner.cleanup()

    assert await otad.daemon.services.devices.is_registered("gw-1"), "the forged form deleted the device"
    await tab.goto("/")  # still logged in: the forged logout did not end the session
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()
