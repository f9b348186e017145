"""Every dashboard page at fleet size, served by a real `otad serve`, beside a bare aiohttp handler
serving the same bytes. Not a test: it prints figures (issue 12, item 10: every page under 200 ms
with 10,000 devices and 100,000 upgrades).

    .venv/bin/python bench/dashboard_pages.py --runs 3
    .venv/bin/python bench/dashboard_pages.py --runs 1 --only /campaigns/1 --profile 15

The fleet (built once, deterministic, bulk-inserted by sqlite3 into a schema otad created):
10,000 devices of the main product plus 1,500 of two smaller ones, 60% with a reported firmware
version (8 versions), 30% online; 100,000 upgrades with their timelines (2-5 entries each: created,
notified, the device's progress, the end), mostly updated, some failed / timed_out / cancelled /
superseded, a few hundred open; 8 packages; 3 campaigns: one running over the main product's
10,000 devices (stages 1-3 of 4 started, in flight at its concurrency limit, so it sends nothing
while measured), one paused, one finished.

Each run: `otad serve` on free loopback ports (the online flags set after its start, which marks
every device offline), a user added with `otad user add`, a login through the form; the reference
process starts with each page's body as otad served it. Per page, otad and the reference
alternately: 2 warm-ups, then N sequential requests on one keep-alive connection, timed from
sending to the last byte (/events: to the end of its first block, then closed). A 404 is reported
as "not there yet". Prints medians and p95 per run, the daemon's CPU per request (utime + stime
from /proc: what a busy machine changes least), the median of the runs' medians, the ratio and the
verdict against 200 ms (on the p95), and the load average before and after. With --profile S the daemon
is also sampled by py-spy for S seconds per page while it is requested, and the hottest frames are
printed. Every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port  # noqa: E402
from bench.report_ingest import cpu_seconds  # noqa: E402
from otad.service.campaigns import stage_of  # noqa: E402
from otad.store.database import Database  # noqa: E402
from tests.dashboard import DashboardClient  # noqa: E402

OTAD = [sys.executable, "-m", "otad"]
PY_SPY = Path(sys.executable).with_name("py-spy")
TARGET_MS = 200.0
WARMUPS = 2
SETTLE = 3.0  # seconds between the daemon's start and the first request
STARTUP_TIMEOUT = 60.0
USER, PASSWORD = "bench", "bench-dashboard-pass"

MAIN, CAMERA, METER = 20101, 20102, 20103  # product ids
SITES = ("sh", "bj", "sz", "gz", "cd", "wh", "hz", "nj")
# (product, package name, version): what otaEnable and campaigns take, 8 versions in the fleet.
PACKAGES = ((MAIN, "gateway-2.0.0", "2.0.0"), (MAIN, "gateway-2.1.0", "2.1.0"), (MAIN, "gateway-2.2.3", "2.2.3"),
            (MAIN, "gateway-2.3.1", "2.3.1"), (MAIN, "gateway-2.4.0", "2.4.0"), (CAMERA, "ipc-1.4.2", "1.4.2"),
            (CAMERA, "ipc-1.5.0", "1.5.0"), (METER, "meter-0.9.8", "0.9.8"))
STAGES = [1, 10, 50, 100]
BUSY_INDEX = 42  # the main product's 43rd device is a test rig: 400 single upgrades
# Ended upgrades of single otaEnable calls, by share.
ENDINGS = (("updated", 80), ("failed", 7), ("superseded", 6), ("timed_out", 4), ("cancelled", 3))
# A device's reports as the timeline keeps them (JSON), and how each ending is written.
_REPORTS = {status: json.dumps({"status": status, "progress": 100})
            for status in ("downloading", "updating", "updated")}
_ENDS = {"updated": ("device", _REPORTS["updated"]),
         "failed": ("device", json.dumps({"status": "failed", "progress": 0, "message": "verify failed: md5"})),
         "timed_out": ("timeout", "no report within the upgrade's timeout"),
         "cancelled": ("admin", "cancelled by adam"),
         "superseded": ("server", "superseded by a newer upgrade")}


def _ts(moment: datetime) -> str:
    return moment.isoformat(sep=" ")  # as tortoise writes a DatetimeField into SQLite


@dataclass
class _Upgrade:
    device: int  # device id
    product: int
    package: int  # package id
    at: datetime
    state: str
    campaign: int | None = None
    stage: int | None = None


@dataclass
class Fleet:
    """What the pages are asked about: names picked from the seeded fleet."""

    data_dir: Path
    devices: int = 0
    upgrades: int = 0
    events: int = 0
    busy_device: str = ""
    busy_upgrade: str = ""
    running_campaign: int = 0
    online_ids: list[int] = field(default_factory=list)


def _device_names(count_main: int, count_other: int, rng: random.Random) -> list[tuple[str, int]]:
    names = [(f"gw-{SITES[i % len(SITES)]}-{i:05d}", MAIN) for i in range(count_main)]
    names += [(f"ipc-{rng.getrandbits(24):06x}-{i:04d}", CAMERA) for i in range(count_other * 4 // 5)]
    names += [(f"meter-{rng.getrandbits(48):012x}", METER) for _ in range(count_other - count_other * 4 // 5)]
    return names


def _history(devices: list[tuple[str, int]], packages: dict[int, list[int]], names: dict[int, str],
             total: int, rng: random.Random, now: datetime) -> list[_Upgrade]:
    """Every device's upgrades: the finished campaign over the main product, the running one over
    its first three stages, the paused one on the cameras' first stage, and single otaEnable calls
    (one device, a test rig, with 400); the open ones are each device's latest."""
    upgrades: list[_Upgrade] = []
    main_ids = [i + 1 for i, (_, product) in enumerate(devices) if product == MAIN]
    for device in main_ids:  # campaign 1: finished, 2.3.1, 70 to 60 days ago
        state = rng.choices(("updated", "failed", "timed_out"), (97, 2, 1))[0]
        upgrades.append(_Upgrade(device, MAIN, packages[MAIN][3], now - timedelta(days=rng.uniform(60, 70)), state, 1,
                                 stage_of(MAIN, PACKAGES[3][1], names[device], STAGES)))
    camera_ids = [i + 1 for i, (_, product) in enumerate(devices) if product == CAMERA]
    for device in camera_ids:  # campaign 2: paused itself in its first stage, a day ago
        stage = stage_of(CAMERA, PACKAGES[6][1], names[device], [5, 100])
        if stage == 0:
            state = rng.choices(("updated", "failed"), (85, 15))[0]
            upgrades.append(_Upgrade(device, CAMERA, packages[CAMERA][1], now - timedelta(hours=rng.uniform(24, 26)),
                                     state, 2, 0))
    running = []
    for device in main_ids:  # campaign 3: running, 2.4.0, stages 1-3 started in the last 3 days
        stage = stage_of(MAIN, PACKAGES[4][1], names[device], STAGES)
        if stage is not None and stage <= 2:
            state = rng.choices(("updated", "failed", "timed_out"), (980, 15, 5))[0]
            running.append(_Upgrade(device, MAIN, packages[MAIN][4], now - timedelta(hours=rng.uniform(3, 72)),
                                    state, 3, stage))
    for upgrade in rng.sample(running, 300):  # in flight: the latest started
        upgrade.state = rng.choices(("notified", "downloading", "updating"), (50, 35, 15))[0]
        upgrade.at = now - timedelta(minutes=rng.uniform(1, 120))
    upgrades += running
    single = total - len(upgrades) - 400 - 150
    others = [i + 1 for i in range(len(devices))]
    chosen = rng.choices(others, k=single) + [main_ids[BUSY_INDEX]] * 400
    states, weights = zip(*ENDINGS)
    for device in chosen:
        product = devices[device - 1][1]
        upgrades.append(_Upgrade(device, product, rng.choice(packages[product]),
                                 now - timedelta(days=rng.uniform(3, 400)), rng.choices(states, weights)[0]))
    in_campaign_2 = {upgrade.device for upgrade in upgrades if upgrade.campaign == 2}
    idle = [device for device in camera_ids if device not in in_campaign_2]
    idle += [i + 1 for i, (_, product) in enumerate(devices) if product == METER]
    for device in rng.sample(idle, 150):  # open single upgrades, started in the last hour
        product = devices[device - 1][1]
        upgrades.append(_Upgrade(device, product, packages[product][-1], now - timedelta(minutes=rng.uniform(1, 60)),
                                 rng.choice(("created", "notified", "downloading"))))
    upgrades.sort(key=lambda upgrade: upgrade.at)
    return upgrades


def _timeline(upgrade_id: int, upgrade: _Upgrade, rng: random.Random) -> list[tuple]:
    """(at, state, source, detail, count, last_at, upgrade_id) rows: created, notified, the device's
    progress (repeated reports folded into one row), the end."""
    at = upgrade.at
    rows = [(at, "created", "server", None, 1, None)]
    if upgrade.state == "created":
        return [(*row, upgrade_id) for row in rows]
    at += timedelta(milliseconds=rng.uniform(5, 300))
    rows.append((at, "notified", "server", None, 1, None))
    if upgrade.state in ("downloading", "updating", "updated", "failed"):
        at += timedelta(seconds=rng.uniform(2, 60))
        reports = rng.randint(1, 20)
        last = at + timedelta(seconds=rng.uniform(10, 300))
        rows.append((at, "downloading", "device", _REPORTS["downloading"], reports,
                     last if reports > 1 else None))
        at = last
    if upgrade.state in ("updating", "updated"):
        at += timedelta(seconds=rng.uniform(1, 20))
        rows.append((at, "updating", "device", _REPORTS["updating"], 1, None))
    end = _ENDS.get(upgrade.state)
    if end:
        at += timedelta(seconds=rng.uniform(5, 120) if upgrade.state != "timed_out" else 3600)
        rows.append((at, upgrade.state, *end, 1, None))
    return [(*row, upgrade_id) for row in rows]


def seed(data_dir: Path, main_devices: int, other_devices: int, total_upgrades: int) -> Fleet:
    """Create the schema as otad does, then bulk-insert the fleet straight into the file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "otad.sqlite3"

    async def create_schema() -> None:
        database = Database(path)
        await database.open()
        await database.close()

    asyncio.run(create_schema())
    rng, now = random.Random(12), datetime.now(timezone.utc)
    devices = _device_names(main_devices, other_devices, rng)
    names = {i + 1: name for i, (name, _) in enumerate(devices)}
    fleet = Fleet(data_dir, devices=len(devices))
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    with db:
        package_ids: dict[int, list[int]] = {}
        package_rows, version_of = [], {}
        for index, (product, name, version) in enumerate(PACKAGES, start=1):
            package_ids.setdefault(product, []).append(index)
            version_of[index] = version
            digest = hashlib.sha256(name.encode()).hexdigest()
            package_rows.append((index, product, name, f"{digest[:32]}.bin", f"{name}.bin",
                                 rng.randint(8, 30) * 2**20 + rng.randint(0, 2**20), digest[:32], digest, version,
                                 f"release {version}", _ts(now - timedelta(days=400 - 50 * index))))
        db.executemany('INSERT INTO "package" ("id", "product_id", "name", "file_name", "original_name", "size", '
                       '"md5", "sha256", "version", "description", "created_at") VALUES (?,?,?,?,?,?,?,?,?,?,?)',
                       package_rows)
        upgrades = _history(devices, package_ids, names, total_upgrades, rng, now)
        files = {row[0]: (row[3], row[6]) for row in package_rows}
        upgrade_rows, event_rows, latest_updated = [], [], {}
        for upgrade_id, upgrade in enumerate(upgrades, start=1):
            timeline = _timeline(upgrade_id, upgrade, rng)
            event_rows += timeline
            ended = upgrade.state in ("updated", "failed", "timed_out", "cancelled", "superseded")
            end_at = timeline[-1][0]
            if upgrade.state == "updated":
                latest_updated[upgrade.device] = version_of[upgrade.package]
            timeout_at = upgrade.at + timedelta(hours=1) if ended else now + timedelta(days=1)
            upgrade_rows.append((
                upgrade_id, str(uuid.UUID(int=rng.getrandbits(128), version=4)), *files[upgrade.package],
                upgrade.state, upgrade.stage, 100 if upgrade.state == "updated" else None,
                "verify failed: md5" if upgrade.state == "failed" else None, _ts(timeout_at),
                _ts(end_at) if ended else None, _ts(upgrade.at), _ts(end_at), upgrade.campaign, upgrade.device,
                upgrade.package))
        db.executemany('INSERT INTO "device" ("id", "name", "product_id", "password_hash", "created_at", '
                       '"remote_addr", "firmware_version", "online", "last_seen") VALUES (?,?,?,?,?,?,?,?,?)',
                       [(i, name, product, hashlib.sha256(name.encode()).hexdigest(),
                         _ts(now - timedelta(days=rng.uniform(400, 500))), f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",
                         latest_updated.get(i, version_of[package_ids[product][0]]) if rng.random() < 0.6 else None,
                         0, _ts(now - timedelta(minutes=rng.uniform(1, 10_000))))
                        for i, (name, product) in enumerate(devices, start=1)])
        db.executemany('INSERT INTO "upgrade" ("id", "version", "file_name", "md5", "state", "stage", "progress", '
                       '"message", "timeout_at", "finished_at", "created_at", "updated_at", "campaign_id", '
                       '"device_id", "package_id") VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)', upgrade_rows)
        event_rows.sort(key=lambda row: row[0])
        db.executemany('INSERT INTO "upgrade_event" ("at", "state", "source", "detail", "changed", "count", '
                       '"last_at", "upgrade_id") VALUES (?,?,?,?,1,?,?,?)',
                       [(_ts(at), state, source, detail, count, _ts(last) if last else None, upgrade_id)
                        for at, state, source, detail, count, last, upgrade_id in event_rows])
        in_flight = sum(1 for upgrade in upgrades if upgrade.campaign == 3 and upgrade.state not in
                        ("updated", "failed", "timed_out"))
        failed_2 = sum(1 for upgrade in upgrades if upgrade.campaign == 2 and upgrade.state == "failed")
        started_2 = sum(1 for upgrade in upgrades if upgrade.campaign == 2)
        campaigns = [  # finished, paused itself, running at its concurrency limit (it sends nothing meanwhile)
            (1, PACKAGES[3][1], MAIN, 4, STAGES, 100, "finished", 3, None, now - timedelta(days=70)),
            (2, PACKAGES[6][1], CAMERA, 7, [5, 100], 50, "paused", 0,
             f"paused itself: {failed_2} of {started_2} devices in stages 1-1 failed (over 5%)",
             now - timedelta(days=1)),
            (3, PACKAGES[4][1], MAIN, 5, STAGES, in_flight, "running", 2, None, now - timedelta(days=3))]
        db.executemany('INSERT INTO "campaign" ("id", "name", "product_id", "package_id", "stages", '
                       '"success_threshold", "failure_threshold", "max_concurrent", "notify_rate", "timeout", '
                       '"state", "current_stage", "failures_accepted", "reason", "created_at", "updated_at") '
                       'VALUES (?,?,?,?,?,0.95,0.05,?,20.0,86400.0,?,?,0,?,?,?)',
                       [(cid, name, product, package, json.dumps(stages), concurrent, state, stage, reason, _ts(at),
                         _ts(at)) for cid, name, product, package, stages, concurrent, state, stage, reason, at
                        in campaigns])
    db.close()
    busy_id = [i + 1 for i, (_, product) in enumerate(devices) if product == MAIN][BUSY_INDEX]
    fleet.busy_device = names[busy_id]
    fleet.busy_upgrade = next(row[1] for row in reversed(upgrade_rows) if row[-2] == busy_id)
    fleet.running_campaign = 3
    fleet.upgrades, fleet.events = len(upgrade_rows), len(event_rows)
    fleet.online_ids = sorted(rng.sample(range(1, len(devices) + 1), len(devices) * 3 // 10))
    subprocess.run(OTAD + ["user", "add", USER, "--password", PASSWORD, "--data-dir", str(data_dir)], check=True,
                   capture_output=True)
    return fleet



def describe(data_dir: Path) -> Fleet:
    """What the pages are asked about, read back from a seeded data dir (also one seeded earlier)."""
    db = sqlite3.connect(data_dir / "otad.sqlite3")
    try:
        (devices,), (upgrades,), (events,) = (db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()
                                              for table in ("device", "upgrade", "upgrade_event"))
        busy_id, busy_device = db.execute('SELECT "device_id", "name" FROM "upgrade" JOIN "device" ON '
                                          '"device"."id" = "device_id" GROUP BY "device_id" ORDER BY COUNT(*) DESC '
                                          'LIMIT 1').fetchone()
        (busy_upgrade,) = db.execute('SELECT "version" FROM "upgrade" WHERE "device_id" = ? ORDER BY "id" DESC '
                                     'LIMIT 1', (busy_id,)).fetchone()
        (running,) = db.execute('SELECT "id" FROM "campaign" WHERE "state" = \'running\' ORDER BY "id" '
                                'LIMIT 1').fetchone()
    finally:
        db.close()
    online = sorted(random.Random(30).sample(range(1, devices + 1), devices * 3 // 10))
    return Fleet(data_dir, devices, upgrades, events, busy_device, busy_upgrade, running, online)


def pages(fleet: Fleet) -> list[tuple[str, str]]:
    """(what, path) of every page the operator opens, with the fleet's own names in them."""
    return [("overview", "/"), ("login form", "/login"), ("packages", "/packages"), ("devices", "/devices"),
            ("devices, search", "/devices?q=sz-01"),
            ("devices, product + online", f"/devices?product={MAIN}&online=yes"),
            ("devices, page 100", "/devices?page=100"), ("device, 400 upgrades", f"/devices/{fleet.busy_device}"),
            ("upgrades", "/upgrades"), ("upgrades, failed", "/upgrades?state=failed"),
            ("upgrades, page 500", "/upgrades?page=500"), ("upgrades, last page", "/upgrades?page=2000"),
            ("upgrade", f"/upgrades/{fleet.busy_upgrade}"),
            ("campaigns", "/campaigns"), ("campaign, 10,000 devices", f"/campaigns/{fleet.running_campaign}"),
            ("live events, first block", "/events")]


class Daemon:
    """`otad serve` on the seeded data dir, loopback ports; 30% of the devices online."""

    def __init__(self, fleet: Fleet, log: Path, settle: float = SETTLE) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            OTAD + ["serve", "--data-dir", str(fleet.data_dir), "--http-host", "127.0.0.1",
                    "--http-port", self.url.rsplit(":", 1)[1], "--mqtt-host", "127.0.0.1",
                    "--mqtt-port", str(free_port()), "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=self._log)
        try:
            self._wait_started(log)
            # Started, it marked every device offline (none is connected): these came back since.
            db = sqlite3.connect(fleet.data_dir / "otad.sqlite3", timeout=10)
            with db:
                db.executemany('UPDATE "device" SET "online" = 1, "last_seen" = ? WHERE "id" = ?',
                               [(_ts(datetime.now(timezone.utc)), i) for i in fleet.online_ids])
            db.close()
            # The campaign engine reads its running campaign's devices and upgrades at its first
            # step after a start: measured is the daemon at work, not its first seconds.
            time.sleep(settle)
        except BaseException:
            self.stop()
            raise

    def _wait_started(self, log: Path) -> None:
        """Until /healthz answers; a busy machine may take its time, a daemon that exited says why."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"otad serve exited with {self.process.returncode}:\n"
                                   + log.read_text(errors="replace")[-2000:])
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2).read()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"otad serve did not answer within {STARTUP_TIMEOUT:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


# The reference: a bare aiohttp handler serving each page's bytes as otad served them.
_REFERENCE = '''
import json, sys
from aiohttp import web
pages = {path: (open(file, "rb").read(), kind) for path, (file, kind) in json.load(open(sys.argv[2])).items()}
async def handler(request):
    if request.path_qs not in pages:
        raise web.HTTPNotFound()
    body, kind = pages[request.path_qs]
    return web.Response(body=body, content_type=kind, charset="utf-8")
app = web.Application()
app.router.add_get("/{tail:.*}", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''


def _session(cookies: bool = False) -> aiohttp.ClientSession:
    """One keep-alive connection, as one browser tab's requests in sequence."""
    jar = aiohttp.CookieJar(unsafe=True) if cookies else aiohttp.DummyCookieJar()
    return aiohttp.ClientSession(cookie_jar=jar, connector=aiohttp.TCPConnector(limit=1),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    """(status, body, content type); a server-sent event stream: up to the end of its first block."""
    async with session.get(url, allow_redirects=False) as response:
        if response.content_type == "text/event-stream":
            body = await response.content.readuntil(b"\n\n")
            response.close()
        else:
            body = await response.read()
        return response.status, body, response.content_type


async def timed(session: aiohttp.ClientSession, url: str, count: int,
                pid: int | None = None) -> tuple[list[float], float]:
    """Seconds per request, sending to the last byte, of ``count`` sequential requests after the
    warm-ups; and the CPU seconds per request of the server ``pid`` meanwhile (what the load on a
    shared machine does not change much)."""
    times, cpu = [], 0.0
    for i in range(WARMUPS + count):
        if i == WARMUPS and pid is not None:
            cpu = cpu_seconds(pid)
        started = time.perf_counter()
        status, _, _ = await fetch(session, url)
        if status != 200:
            raise RuntimeError(f"{url}: HTTP {status} while timing")
        if i >= WARMUPS:
            times.append(time.perf_counter() - started)
    return times, (cpu_seconds(pid) - cpu) / count if pid is not None else 0.0


def _p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20, method="inclusive")[18]


@dataclass
class PageRun:
    status: int
    size: int
    otad: list[float] = field(default_factory=list)
    otad_cpu: float = 0.0  # the daemon's CPU seconds per request
    reference: list[float] = field(default_factory=list)


async def log_in(url: str) -> DashboardClient:
    """Through the form, as a browser: the login page's CSRF token, then the POST."""
    client = DashboardClient(url, _session(cookies=True))
    status, _, location = await client.post("/login", {"username": USER, "password": PASSWORD, "next": "/"})
    if (status, location) != (303, "/"):
        await client.close()
        raise RuntimeError(f"login failed: HTTP {status}")
    return client


async def _wait_reference(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(200):
        try:
            await fetch(session, url)
            return
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the reference server did not answer")


async def measure(daemon: Daemon, paths: list[str], count: int, workdir: Path) -> dict[str, PageRun]:
    """One run: each page captured, then otad and the reference timed alternately, page by page."""
    client = await log_in(daemon.url)
    plain = _session()
    reference = None
    try:
        runs, manifest = {}, {}
        for i, path in enumerate(paths):
            status, body, kind = await fetch(client.session, daemon.url + path)
            runs[path] = PageRun(status, len(body))
            if status == 200:
                (workdir / f"page{i}").write_bytes(body)
                manifest[path] = (str(workdir / f"page{i}"), kind)
        (workdir / "pages.json").write_text(json.dumps(manifest))
        (workdir / "reference.py").write_text(_REFERENCE)
        port = free_port()
        reference = subprocess.Popen([sys.executable, str(workdir / "reference.py"), str(port),
                                      str(workdir / "pages.json")])
        await _wait_reference(plain, f"http://127.0.0.1:{port}/")
        for path in manifest:
            runs[path].otad, runs[path].otad_cpu = await timed(client.session, daemon.url + path, count,
                                                               daemon.process.pid)
            runs[path].reference, _ = await timed(plain, f"http://127.0.0.1:{port}{path}", count)
        return runs
    finally:
        if reference is not None:
            os.kill(reference.pid, signal.SIGTERM)
            reference.wait(10)
        await plain.close()
        await client.close()


async def profile(daemon: Daemon, path: str, seconds: int, out: Path) -> list[str]:
    """py-spy samples of the daemon while ``path`` is requested in a loop: where its time goes."""
    client = await log_in(daemon.url)
    try:
        spy = subprocess.Popen([str(PY_SPY), "record", "--pid", str(daemon.process.pid), "--duration", str(seconds),
                                "--rate", "200", "--threads", "--format", "raw", "--output", str(out), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        requests = 0
        while spy.poll() is None:
            await fetch(client.session, daemon.url + path)
            requests += 1
        if spy.returncode != 0:
            return [f"py-spy failed: {spy.stderr.read().decode().strip()[-300:]}"]
    finally:
        await client.close()
    return [f"{requests} requests in {seconds} s"] + hottest(out)


def hottest(raw: Path, shown: int = 14) -> list[str]:
    """From py-spy's raw (collapsed) stacks: the share of busy samples per thread, then per frame
    including its callees (otad's, the ORM's, Jinja's and the driver's frames), then per leaf frame."""
    threads, inclusive, leaves, total = Counter(), Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, samples = stack.split(";"), int(count)
        total += samples
        threads[frames[0]] += samples
        leaves[frames[-1]] += samples
        for frame in set(frames[1:]):
            if any(part in frame for part in ("otad/", "tortoise/", "jinja2/", "aiosqlite/", "pypika")):
                inclusive[frame] += samples
    if not total:
        return ["no busy samples"]
    share = lambda n: f"{100 * n / total:5.1f}%"  # noqa: E731
    lines = [f"{total} busy samples"] + [f"  {share(n)}  {name}" for name, n in threads.most_common(4)]
    lines += ["  with callees:"] + [f"    {share(n)}  {frame}" for frame, n in inclusive.most_common(shown)]
    lines += ["  own time:"] + [f"    {share(n)}  {frame}" for frame, n in leaves.most_common(shown // 2)]
    return lines


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def report(paths: list[tuple[str, str]], runs: list[dict[str, PageRun]]) -> list[tuple[str, str, float]]:
    """The table: per page, the median of the runs' medians and p95s, the reference, the ratio, the
    verdict. Returns (what, path, median ms) of the pages over the target."""
    print(f"\n| page | path | bytes | otad median (ms) | otad p95 | otad CPU/request | reference median | ratio "
          f"| under {TARGET_MS:.0f} ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    over = []
    for what, path in paths:
        first = runs[0][path]
        if first.status != 200:
            verdict = "not there yet" if first.status == 404 else f"HTTP {first.status}"
            print(f"| {what} | `{path}` | - | - | - | - | - | - | {verdict} |")
            continue
        median = statistics.median(1000 * statistics.median(run[path].otad) for run in runs)
        p95 = statistics.median(1000 * _p95(run[path].otad) for run in runs)
        cpu = statistics.median(1000 * run[path].otad_cpu for run in runs)
        reference = statistics.median(1000 * statistics.median(run[path].reference) for run in runs)
        verdict = "PASS" if p95 < TARGET_MS else "p95 over" if median < TARGET_MS else "over"
        if median >= TARGET_MS or p95 >= TARGET_MS:
            over.append((what, path, median))
        print(f"| {what} | `{path}` | {first.size:,} | {median:.1f} | {p95:.1f} | {cpu:.0f} | {reference:.2f} | "
              f"{median / reference:.0f}x | {verdict} |")
    return over


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000, help="devices of the main product (the campaign's)")
    parser.add_argument("--other-devices", type=int, default=1_500, help="devices of the two smaller products")
    parser.add_argument("--upgrades", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page and run")
    parser.add_argument("--only", action="append", help="a page's path (repeatable); default: all")
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                        help="then sample the daemon with py-spy on each page over the target (and each --only)")
    parser.add_argument("--settle", type=float, default=SETTLE, help="seconds after the daemon's start")
    parser.add_argument("--data-dir", type=Path, help="seed here, or reuse the fleet already seeded here")
    args = parser.parse_args()
    print(f"nproc {os.cpu_count()}; load average at start {_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="otad-pages-") as scratch:
        workdir = Path(scratch)
        data_dir = args.data_dir or workdir / "otad"
        if not (data_dir / "otad.sqlite3").exists():
            started = time.perf_counter()
            seed(data_dir, args.devices, args.other_devices, args.upgrades)
            print(f"seeded in {time.perf_counter() - started:.1f} s", flush=True)
        fleet = describe(data_dir)
        print(f"fleet: {fleet.devices:,} devices ({len(fleet.online_ids):,} online), {fleet.upgrades:,} upgrades, "
              f"{fleet.events:,} timeline entries; busiest device {fleet.busy_device}; running campaign "
              f"{fleet.running_campaign}", flush=True)
        paths = [(what, path) for what, path in pages(fleet) if not args.only or path in args.only]
        runs = []
        for number in range(1, args.runs + 1):
            daemon = Daemon(fleet, workdir / "otad.log", args.settle)
            try:
                result = asyncio.run(measure(daemon, [path for _, path in paths], args.requests, workdir))
            finally:
                daemon.stop()
            runs.append(result)
            for path, page in result.items():
                timing = (f"otad median {1000 * statistics.median(page.otad):.1f} ms, "
                          f"p95 {1000 * _p95(page.otad):.1f}, CPU {1000 * page.otad_cpu:.0f} ms/request; "
                          f"reference {1000 * statistics.median(page.reference):.2f} ms" if page.otad else "")
                print(f"run {number}: {path} HTTP {page.status}, {page.size:,} B {timing}", flush=True)
            print(f"run {number}: load average {_load()}", flush=True)
        print(f"load average at end {_load()}; medians of {args.runs} runs, {args.requests} requests each "
              f"after {WARMUPS} warm-ups")
        over = report(paths, runs)
        profiled = {path for _, path, _ in over} | set(args.only or ()) if args.profile else set()
        for what, path in paths:
            if path not in profiled or runs[0][path].status != 200:
                continue
            daemon = Daemon(fleet, workdir / "otad.log")
            try:
                lines = asyncio.run(profile(daemon, path, args.profile, workdir / "profile.txt"))
            finally:
                daemon.stop()
            print(f"\nprofile of {path} ({what}): " + "\n".join(lines), flush=True)
        log = (workdir / "otad.log").read_text(errors="replace").strip()
        if log:
            print("\notad's log (warnings and errors):\n" + log[-3000:])


if __name__ == "__main__":
    main()
