"""Nothing acknowledged is lost: a PUBACK for a report means it is committed, under load, across
SIGKILL and SIGTERM, and on a full disk; history stays bounded; what the store cannot hold is
refused with a reason."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest

from otad.daemon import Daemon
from tests.conftest import db_query, eventually, free_port, make_settings, sqlite_only, start_otad
from tests.helpers import assert_error, campaign_body, register_fleet, serve, wait_for_port
from tests.rawmqtt import PUBACK, PUBLISH, RawClient, ack_packet, parse_publish, publish_packet

STATUSES = ("downloading", "downloaded", "verified", "updating", "updated")


def _report(version: str, status: str, **extra) -> bytes:
    return json.dumps({"version": version, "status": status, **extra}).encode()


def _upgrade_states(settings) -> dict[str, str]:
    return dict(db_query(settings, 'SELECT d.name, u.state FROM upgrade u JOIN device d ON d.id = u.device_id'))


async def _connected(port: int, name: str, password: str) -> RawClient:
    client = RawClient(port)
    assert (await client.connect(name, name, password))[1] == 0
    return client


async def _send_and_count_pubacks(client: RawClient, name: str, reports: list[bytes], timeout: float = 30.0) -> int:
    """Send every report at once (QoS 1, pipelined) and read until each has its PUBACK."""
    for payload in reports:
        client.send(publish_packet(f"/oc/devices/{name}/sys/ota/report", payload, 1, client.packet_id()))
    acked = 0
    while acked < len(reports):
        kind, flags, body = await client.read(timeout)
        if kind == PUBACK:
            acked += 1
        elif kind == PUBLISH and (message := parse_publish(flags, body)).qos == 1:
            client.send(ack_packet(PUBACK, message.packet_id))
    return acked


async def _enable_all(otad, names, package: str = "fw") -> dict[str, str]:
    versions = {}
    for name in names:
        status, body = await otad.enable(package, name)
        assert status == 200, body
        versions[name] = body["data"][0]["version"]
    return versions


async def _connected_fleet(otad, count: int) -> tuple[dict[str, str], dict[str, str], list[RawClient]]:
    """``count`` devices, each with an enabled upgrade and an MQTT connection: (passwords,
    versions, clients), by device name."""
    passwords = await register_fleet(otad, count, product_id=1)
    await otad.upload("fw", 1, b"image")
    versions = await _enable_all(otad, passwords)
    clients = await asyncio.gather(*(_connected(otad.mqtt_port, n, p) for n, p in passwords.items()))
    return passwords, versions, clients


async def test_a_burst_of_every_status_from_hundreds_of_devices_is_all_applied(otad):
    passwords, versions, clients = await _connected_fleet(otad, 300)
    try:
        acked = await asyncio.gather(*(
            _send_and_count_pubacks(client, name, [_report(versions[name], s, progress=100) for s in STATUSES])
            for client, name in zip(clients, passwords)))
        assert acked == [len(STATUSES)] * len(passwords)
        # Acknowledged means committed: read straight from the database, nothing left to wait for;
        # every report moved its upgrade a step (created, notified, then the five).
        assert set(_upgrade_states(otad.settings).values()) == {"updated"}
        steps: dict[int, list[str]] = {}
        for upgrade_id, state in db_query(otad.settings, "SELECT upgrade_id, state FROM upgrade_event "
                                                         "WHERE changed ORDER BY id"):
            steps.setdefault(upgrade_id, []).append(state)
        assert len(steps) == len(passwords)
        assert {",".join(row) for row in steps.values()} == {"created,notified," + ",".join(STATUSES)}
    finally:
        await asyncio.gather(*(client.close() for client in clients))


async def test_progress_reports_from_many_devices_all_arrive(otad):
    passwords, versions, clients = await _connected_fleet(otad, 100)
    try:
        reports = lambda v: ([_report(v, "downloading", progress=p) for p in range(0, 101, 5)]  # noqa: E731
                             + [_report(v, s) for s in STATUSES[1:]])
        await asyncio.gather(*(_send_and_count_pubacks(c, n, reports(versions[n])) for c, n in zip(clients, passwords)))
        assert set(_upgrade_states(otad.settings).values()) == {"updated"}
        status, body = await otad.request("GET", f"/api/v2/upgrades/{versions['gw-000']}")
        downloading = [event for event in body["data"]["timeline"] if event["state"] == "downloading"]
        assert len(downloading) == 1 and downloading[0]["count"] == 21
        assert json.loads(downloading[0]["detail"])["progress"] == 100
    finally:
        await asyncio.gather(*(client.close() for client in clients))


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM])
async def test_acknowledged_reports_survive_the_daemon_being_stopped(tmp_path, stop_signal):
    http_port, mqtt_port = free_port(), free_port()
    process = serve(tmp_path, http_port, mqtt_port)
    clients: list[RawClient] = []
    try:
        await wait_for_port(http_port, process)
        token = subprocess.run([os.sys.executable, "-m", "otad", "token", "create", "t", "--data-dir", str(tmp_path)],
                               capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
        base, headers = f"http://127.0.0.1:{http_port}", {"Authorization": token}
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.post(f"{base}/api/v2/devices",
                                 json=[{"deviceName": f"d{i}", "productId": 1} for i in range(20)]) as response:
                passwords = {e["deviceName"]: e["password"] for e in (await response.json())["data"]}
            form = aiohttp.FormData()
            form.add_field("file", b"image", filename="fw.bin")
            async with http.post(f"{base}/api/v2/otaUpload?name=fw&productId=1", data=form) as response:
                assert response.status == 200
            versions = {}
            for name in passwords:
                async with http.post(f"{base}/api/v2/otaEnable?name=fw&deviceName={name}") as response:
                    versions[name] = (await response.json())["data"][0]["version"]
        clients = await asyncio.gather(*(_connected(mqtt_port, n, p) for n, p in passwords.items()))
        await asyncio.gather(*(_send_and_count_pubacks(c, n, [_report(versions[n], "updated")])
                               for c, n in zip(clients, passwords)))
        process.send_signal(stop_signal)  # at once, right after the last PUBACK
        process.wait(timeout=30)
    finally:
        for client in clients:
            await client.close()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()
    states = _upgrade_states(make_settings(tmp_path))
    assert states == {name: "updated" for name in passwords}
    # And the restarted daemon sees them applied too.
    restarted = await start_otad(make_settings(tmp_path))
    try:
        status, body = await restarted.request("GET", "/api/v2/upgrades", params={"state": "updated"})
        assert body["data"]["total"] == 20
    finally:
        await restarted.stop()


async def test_out_of_order_reports_are_capped_but_state_changes_are_kept(tmp_path):
    otad = await start_otad(make_settings(tmp_path / "data", **{"upgrade.timeline_limit": 10}))
    try:
        password = await otad.add_device("dev1", 1)
        await otad.upload("fw", 1, b"image")
        (version,) = (await _enable_all(otad, ["dev1"])).values()
        client = await _connected(otad.mqtt_port, "dev1", password)
        try:
            late = [_report(version, "downloading" if i % 2 else "downloaded") for i in range(300)]
            await _send_and_count_pubacks(client, "dev1", [_report(version, "verified")] + late
                                          + [_report(version, "updated")])
        finally:
            await client.close()
        status, body = await otad.request("GET", f"/api/v2/upgrades/{version}", params={"timelinePageSize": 500})
        upgrade = body["data"]
        changes = [event["state"] for event in upgrade["timeline"] if event["changed"]]
        assert changes == ["created", "notified", "verified", "updated"]
        assert upgrade["timelineTotal"] == len(upgrade["timeline"]) == 4 + 10
        # The latest notes are the ones kept.
        assert [event["state"] for event in upgrade["timeline"] if not event["changed"]][-1] == "downloading"
        status, page = await otad.request("GET", f"/api/v2/upgrades/{version}",
                                          params={"timelinePage": 2, "timelinePageSize": 5})
        assert [e["at"] for e in page["data"]["timeline"]] == [e["at"] for e in upgrade["timeline"][5:10]]
    finally:
        await otad.stop()


async def test_a_version_longer_than_the_store_keeps_is_refused_with_a_reason(otad, caplog):
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"image")
    (version,) = (await _enable_all(otad, ["dev1"])).values()
    client = await _connected(otad.mqtt_port, "dev1", password)
    try:
        await client.subscribe(("/oc/devices/dev1/sys/ota/report_reply", 0))
        with caplog.at_level(logging.WARNING):
            for length in (129, 500, 1024):
                client.send(publish_packet("/oc/devices/dev1/sys/ota/report",
                                           _report(version, "downloading", currentVersion="9" * length), 1,
                                           client.packet_id()))
                reply = json.loads((await client.message()).payload)
                assert reply == {"version": version, "accepted": False,
                                 "errorMsg": "currentVersion must be at most 128 characters"}
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
        # 128 fits, and is stored whole.
        await _send_and_count_pubacks(client, "dev1", [_report(version, "downloading", currentVersion="8" * 128)])
    finally:
        await client.close()
    # (The PUBACK counted may be a refused report's, sent after its reply: wait for the write.)
    await eventually(lambda: db_query(otad.settings, "SELECT firmware_version FROM device") == [("8" * 128,)])
    status, body = await otad.request("GET", "/api/v2/devices")
    assert body["data"][0]["firmwareVersion"] == "8" * 128


class SteppingClock:
    """The daemon's clock, moved by the test (timestamps are shown to the second)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


async def test_updated_at_moves_with_every_change(tmp_path):
    clock = SteppingClock()
    otad = await start_otad(make_settings(tmp_path / "data"), clock=clock)
    client = None
    try:
        password = await otad.add_device("dev1", 1)
        await otad.upload("fw", 1, b"image")
        (version,) = (await _enable_all(otad, ["dev1"])).values()
        _, body = await otad.request("GET", f"/api/v2/upgrades/{version}")
        seen = [body["data"]["updatedAt"]]
        client = await _connected(otad.mqtt_port, "dev1", password)
        for status in ("downloading", "downloading", "verified", "updated"):
            clock.now += timedelta(minutes=1)
            await _send_and_count_pubacks(client, "dev1", [_report(version, status, progress=50)])
            _, body = await otad.request("GET", f"/api/v2/upgrades/{version}")
            seen.append(body["data"]["updatedAt"])
        _, listed = await otad.request("GET", "/api/v2/upgrades")
        assert listed["data"]["items"][0]["updatedAt"] == seen[-1] == "2026-12-01T12:04:00Z"
    finally:
        if client is not None:
            await client.close()
        await otad.stop()
    assert seen == sorted(set(seen))  # every change, a later time


async def test_a_second_live_campaign_of_the_same_package_is_refused(otad):
    await register_fleet(otad, 3)
    await otad.upload("fw-2.0", 7, b"new firmware")
    status, first = await otad.request("POST", "/api/v2/campaigns", json=campaign_body())
    assert status == 200
    status, body = await otad.request("POST", "/api/v2/campaigns", json=campaign_body())
    assert_error(status, body, 409, 1001)
    assert f"campaign {first['data']['id']}" in body["errorMsg"]
    status, _ = await otad.request("POST", f"/api/v2/campaigns/{first['data']['id']}/cancel")
    assert status == 200
    status, _ = await otad.request("POST", "/api/v2/campaigns", json=campaign_body())
    assert status == 200  # once the first has ended, a new one may start


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs, mounted for the test and unmounted after it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


@sqlite_only("fills the disk under the SQLite file")
async def test_a_full_disk_withholds_pubacks_shows_in_healthz_and_recovers(small_disk):
    otad = await start_otad(make_settings(small_disk / "data"))
    client = None
    try:
        password = await otad.add_device("dev1", 1)
        await otad.upload("fw", 1, b"image")
        (version,) = (await _enable_all(otad, ["dev1"])).values()
        client = await _connected(otad.mqtt_port, "dev1", password)
        await _send_and_count_pubacks(client, "dev1", [_report(version, "downloaded")])
        filler = _fill(small_disk)
        # Reports that still fit in space SQLite already holds are committed and acknowledged;
        # the first that needs new space gets no PUBACK. (Late "downloading" reports after
        # "downloaded": each one a write, folded into one timeline entry that shows the latest.)
        long_message = "x" * 1000
        unacked = None
        for i in range(400):
            payload = _report(version, "downloading", message=f"{long_message}-{i}")
            client.send(publish_packet("/oc/devices/dev1/sys/ota/report", payload, 1, client.packet_id()))
            try:
                while (await client.read(1.0))[0] != PUBACK:
                    pass
            except (asyncio.TimeoutError, TimeoutError):
                unacked = i
                break
        assert unacked is not None, "every report was acknowledged on a full disk"
        async with otad.session.get(f"{otad.url}/healthz") as response:
            assert response.status == 503
            assert "no space" in (await response.json())["database"]
        status, body = await otad.upload("fw-2", 1, b"more firmware" * 1000)
        assert_error(status, body, 507, 999)
        assert otad.db_rows("package") == 1 and len(otad.firmware_files()) == 1
        # Space comes back: the held report is applied and acknowledged without being re-sent.
        filler.unlink()
        while (await client.read(10.0))[0] != PUBACK:
            pass
        status, body = await otad.request("GET", f"/api/v2/upgrades/{version}")
        latest = body["data"]["timeline"][-1]
        assert latest["state"] == "downloading" and latest["count"] == unacked + 1
        assert json.loads(latest["detail"])["message"].endswith(f"-{unacked}")  # the held one, applied
        for _ in range(50):  # a firmware store that failed is probed again after a few quiet seconds
            async with otad.session.get(f"{otad.url}/healthz") as response:
                if response.status == 200:
                    break
            await asyncio.sleep(0.2)
        assert response.status == 200
        status, body = await otad.upload("fw-2", 1, b"more firmware" * 1000)
        assert status == 200
    finally:
        if client is not None:
            await client.close()
        await otad.stop()


@sqlite_only("rewrites the SQLite file back to schema version 1 (PostgreSQL has no version before tortoise's migrations)")
async def test_a_version_1_database_is_migrated_whole(tmp_path):
    """A database as otad created it before timelines folded and boards activated: migrated in
    place, its late reports marked as notes, its boards still boards."""
    settings = make_settings(tmp_path / "data")
    otad = await start_otad(settings)
    try:
        password = await otad.add_device("dev1", 1)
        await otad.upload("fw", 1, b"image")
        (version,) = (await _enable_all(otad, ["dev1"])).values()
        client = await _connected(otad.mqtt_port, "dev1", password)
        await _send_and_count_pubacks(client, "dev1", [_report(version, "downloading")])
        await client.close()
    finally:
        await otad.stop()
    with sqlite3.connect(settings.database_path) as conn:  # back to version 1's schema
        conn.executescript(
            'CREATE TABLE old_event AS SELECT id, at, state, source, detail, upgrade_id FROM upgrade_event;'
            'DROP TABLE upgrade_event;'
            'CREATE TABLE upgrade_event ("id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, "at" TIMESTAMP NOT NULL, '
            '"state" VARCHAR(16) NOT NULL, "source" VARCHAR(16) NOT NULL, "detail" TEXT, '
            '"upgrade_id" INT NOT NULL REFERENCES "upgrade" ("id") ON DELETE CASCADE);'
            'INSERT INTO upgrade_event SELECT * FROM old_event; DROP TABLE old_event;'
            # a late report, as version 1 stored it: a second "downloading" row
            'INSERT INTO upgrade_event (at, state, source, detail, upgrade_id) '
            "SELECT at, 'downloading', 'device', '{}', upgrade_id FROM upgrade_event LIMIT 1;"
            'DROP TABLE xiaozhi_activation; DROP TABLE delta_patch; DROP TABLE tortoise_migrations;'
            "UPDATE device SET last_check_at = '2026-11-01 00:00:00+00:00' WHERE name = 'dev1';"
            'ALTER TABLE user DROP COLUMN role; ALTER TABLE api_token DROP COLUMN role;'  # before roles (v4)
            'UPDATE schema_version SET version = 1;')
    daemon = Daemon(settings)
    await daemon.start()
    try:
        upgrade = await daemon.services.upgrades.get(version)
        timeline = (await daemon.services.upgrades.timeline(upgrade)).items
        assert [(e.state, e.changed) for e in timeline] == [
            ("created", True), ("notified", True), ("downloading", True), ("downloading", False)]
        # a token made before roles existed could change everything, and still can
        assert (await daemon.services.admins.check_authorization(f"Bearer {otad.token}", change=True)).role == "admin"
    finally:
        await daemon.stop()
    with sqlite3.connect(settings.database_path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] >= 3
        assert conn.execute("SELECT device_name, client_id FROM xiaozhi_activation").fetchall() == [("dev1", "")]
