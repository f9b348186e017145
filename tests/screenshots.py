"""The README's screenshots of the dashboard, taken from a real daemon with a small fleet.

Run by hand from the repository root after a change to the pages (it is not a test)::

    .venv/bin/python -m tests.screenshots [--out docs/screenshots]

It starts otad on free 127.0.0.1 ports in a temporary directory, registers 50 devices of three
products, uploads four packages, connects 40 devices as real MQTT clients (raw sockets, as in the
campaign tests) that answer their OTA commands with reports, lets upgrades end in every state and
leaves one campaign running and one paused by its failures; then logs in through the form with
headless chromium (tests/browser.py) and saves each page at 1280x800.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from playwright.async_api import async_playwright

from otad.service.campaigns import stage_of
from tests.browser import CHROMIUM_ARGS, TIMEOUT_MS, Tab, chromium_path
from tests.conftest import make_settings, running_otad
from tests.rawmqtt import RawClient, publish_packet

VIEWPORT = {"width": 1280, "height": 800}
# product -> (device name prefix, how many, how many of them stay offline)
PRODUCTS = {7: ("gw", 30, 4), 8: ("cam", 12, 3), 9: ("sensor", 8, 3)}
PACKAGES = [("gw-fw-2.0", 7, 1_400_000), ("gw-fw-2.1", 7, 1_450_000), ("cam-fw-1.4", 8, 3_100_000),
            ("sensor-fw-0.9", 9, 220_000)]
GATEWAY_STAGES = [20, 60, 100]


class Device:
    """A connected device: on each OTA command it reports what ``plan(name, version)`` says."""

    def __init__(self, port: int, name: str, password: str, plan) -> None:
        self.name, self.password, self.plan = name, password, plan
        self.client = RawClient(port)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        _, code = await self.client.connect(f"{self.name}-shot", self.name, self.password)
        assert code == 0, (self.name, code)
        assert await self.client.subscribe((f"/oc/devices/{self.name}/sys/ota", 1)) == [1]
        self.task = asyncio.create_task(self._answer(), name=f"device {self.name}")

    async def _answer(self) -> None:
        topic = f"/oc/devices/{self.name}/sys/ota/report"
        try:
            while True:
                message = await self.client.message(timeout=3600)
                version = json.loads(message.payload)["version"]
                for report in self.plan(self.name, version):
                    await asyncio.sleep(0.05)
                    self.client.send(publish_packet(topic, json.dumps({"version": version, **report}).encode()))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


def _reports(final: str, current: str | None = None, progress: int | None = None) -> list[dict]:
    steps = [{"status": "downloading", "progress": 30}]
    if final == "downloading":
        return [{"status": "downloading", "progress": progress or 60}]
    if final == "updating":
        return steps + [{"status": "downloaded", "progress": 100}, {"status": "verified"}, {"status": "updating"}]
    if final == "failed":
        return steps + [{"status": "failed", "message": "verify failed: md5 mismatch"}]
    return steps + [{"status": "downloaded", "progress": 100}, {"status": "updated", "currentVersion": current}]


class Plan:
    """What each device answers, by phase: a first round of upgrades that mostly succeed, then a
    campaign where some devices are still at work when the pictures are taken."""

    def __init__(self) -> None:
        self.phase = "history"

    def __call__(self, name: str, version: str) -> list[dict]:
        index = int(name.rsplit("-", 1)[1])
        if self.phase == "history":
            current = {"gw": "2.0.0", "cam": "1.4.2", "sensor": "0.9.1"}[name.split("-")[0]]
            return _reports("failed" if index % 9 == 4 else "updated", current)
        if name.startswith("cam"):  # the camera campaign: its canaries fail, so it pauses itself
            return _reports("failed")
        # The gateway campaign: its first stage all updates, so it moves on; in the next some
        # devices are still at work when the pictures are taken.
        if stage_of(7, "gw-fw-2.1", name, GATEWAY_STAGES) == 0:
            return _reports("updated", "2.1.0")
        final = ("downloading", "updated", "updating", "updated")[index % 4]
        return _reports(final, "2.1.0", progress=10 + (index * 7) % 80)


async def _wait(predicate, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.2)


async def build_fleet(otad) -> tuple[list[Device], int]:
    """Devices, packages, upgrades in every state and two campaigns; returns the connected devices
    and the id of the campaign still running."""
    passwords: dict[str, str] = {}
    offline: set[str] = set()
    for product, (prefix, count, dark) in PRODUCTS.items():
        names = [f"{prefix}-{i:03d}" for i in range(count)]
        status, body = await otad.request("POST", "/api/v2/devices",
                                          json=[{"deviceName": n, "productId": product} for n in names])
        assert status == 200, body
        passwords.update({entry["deviceName"]: entry["password"] for entry in body["data"]})
        offline.update(names[-dark:])
    for name, product, size in PACKAGES:
        status, body = await otad.upload(name, product, os.urandom(size), filename=f"{name}.bin",
                                         version=name.rsplit("-", 1)[1] + ".0",
                                         description=f"{name.split('-')[0]} firmware, release build")
        assert status == 200, body

    plan = Plan()
    devices = [Device(otad.mqtt_port, name, password, plan) for name, password in passwords.items()
               if name not in offline]
    await asyncio.gather(*(device.start() for device in devices))

    # The first round: every online device gets its product's first package; two offline ones are
    # told too and stay "notified" until they come back.
    first = {7: "gw-fw-2.0", 8: "cam-fw-1.4", 9: "sensor-fw-0.9"}
    for name in [d.name for d in devices] + sorted(offline)[:2]:
        product = next(p for p, (prefix, _, _) in PRODUCTS.items() if name.startswith(prefix + "-"))
        status, body = await otad.enable(first[product], name)
        assert status == 200, body

    async def round_done() -> bool:
        _, body = await otad.request("GET", "/api/v2/upgrades", params={"state": "downloading", "pageSize": "1"})
        return body["data"]["total"] == 0
    await asyncio.sleep(1)
    await _wait(round_done)

    plan.phase = "campaign"
    status, body = await otad.request("POST", "/api/v2/campaigns", json={
        "name": "gw-fw-2.1", "productId": 7, "stages": GATEWAY_STAGES, "successThreshold": 0.6,
        "failureThreshold": 0.3, "maxConcurrent": 50, "notifyRate": 50})
    assert status == 200, body
    gateway_campaign = body["data"]["id"]
    status, body = await otad.request("POST", "/api/v2/campaigns", json={
        "name": "cam-fw-1.4", "productId": 8, "stages": [25, 100], "successThreshold": 0.9,
        "failureThreshold": 0.2, "maxConcurrent": 10, "notifyRate": 10})
    assert status == 200, body
    camera_campaign = body["data"]["id"]

    async def camera_paused() -> bool:
        _, body = await otad.request("GET", f"/api/v2/campaigns/{camera_campaign}")
        return body["data"]["state"] == "paused"
    await _wait(camera_paused)
    await asyncio.sleep(2)  # the gateway campaign moves on to its next stage
    return devices, gateway_campaign


async def shoot(tab: Tab, path: str | None, out: Path, name: str) -> None:
    if path is None:
        print(f"{name}: nothing to show, skipped", file=sys.stderr)
        return
    response = await tab.page.goto(tab.url(path))
    if response is None or response.status >= 400:
        print(f"{name}: GET {path} answered {response and response.status}, skipped", file=sys.stderr)
        return
    await tab.page.wait_for_timeout(1_200)  # one live message: the status says "live"
    await tab.page.screenshot(path=str(out / f"{name}.png"))
    print(f"{name}: {path} -> {out / f'{name}.png'}")


async def take(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="otad-shots-") as tmp:
        settings = make_settings(Path(tmp) / "data", log_level="warning")
        async with running_otad(settings) as otad, async_playwright() as playwright:
            devices, running = await build_fleet(otad)
            browser = await playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(viewport=VIEWPORT)
                context.set_default_timeout(TIMEOUT_MS)
                tab = Tab(page=await context.new_page(), base=otad.url)
                context.on("request", lambda request: tab.requests.append(request.url))
                await tab.goto("/login")
                await tab.page.screenshot(path=str(out / "login.png"))
                print(f"login: /login -> {out / 'login.png'}")
                await tab.log_in(otad, "adam")
                await shoot(tab, "/", out, "overview")
                await shoot(tab, "/packages", out, "packages")
                await shoot(tab, "/devices", out, "devices")
                # A device that is mid-upgrade in the campaign, with the first round in its history.
                _, busy = await otad.request("GET", "/api/v2/upgrades", params={"state": "downloading"})
                await shoot(tab, f"/devices/{busy['data']['items'][0]['deviceName']}", out, "device")
                await shoot(tab, "/upgrades", out, "upgrades")
                # One mid-way, with device reports in its timeline.
                _, working = await otad.request("GET", "/api/v2/upgrades", params={"state": "updating"})
                await shoot(tab, f"/upgrades/{working['data']['items'][0]['version']}", out, "upgrade")
                await shoot(tab, "/campaigns", out, "campaigns")
                await shoot(tab, f"/campaigns/{running}", out, "campaign")
                tab.check()  # nothing came from outside, no script error
            finally:
                await browser.close()
                await asyncio.gather(*(device.stop() for device in devices))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    asyncio.run(take(parser.parse_args().out))


if __name__ == "__main__":
    main()
