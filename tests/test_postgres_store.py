"""The store on PostgreSQL beside SQLite: the same schema from the same migrations, old SQLite
databases taken over by tortoise's migrations without creating anything twice, two nodes starting
together on one database, and an operator's day on PostgreSQL (admin commands included).

(The whole suite also runs against PostgreSQL: .ci/run's second run, OTAD_TEST_DATABASE_URL.)"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from otad.daemon import Daemon
from otad.store.database import Database
from tests.conftest import db_query, make_settings, running_otad
from tests.postgres import fetch, fresh_database, postgres_url  # noqa: F401  (the fixture)

# Every migration otad ships, as tortoise_migrations records them once applied.
APPLIED = [("models", path.stem) for path in sorted((Path(__file__).parent.parent / "otad" / "store" / "migrations")
                                                    .glob("[0-9]*.py"))]


def _sqlite_columns(path: Path) -> dict[str, set[str]]:
    with sqlite3.connect(path) as conn:
        tables = [row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {table: {row[1] for row in conn.execute(f'PRAGMA table_info("{table}")')} for table in tables}


def _postgres_columns(url: str) -> dict[str, set[str]]:
    columns: dict[str, set[str]] = {}
    for table, column in fetch(url, "SELECT table_name, column_name FROM information_schema.columns "
                                    "WHERE table_schema = 'public'"):
        columns.setdefault(table, set()).add(column)
    return columns


async def _open_and_close(path: Path, url: str = "") -> None:
    database = Database(path, url)
    try:
        await asyncio.wait_for(database.open(), 30)
    finally:
        await database.close()


async def test_a_fresh_postgresql_and_a_fresh_sqlite_database_get_the_same_tables(tmp_path, postgres_url):
    url = fresh_database(postgres_url)
    await _open_and_close(tmp_path / "otad.sqlite3")
    await _open_and_close(tmp_path / "unused.sqlite3", url)
    on_sqlite, on_postgres = _sqlite_columns(tmp_path / "otad.sqlite3"), _postgres_columns(url)
    assert on_sqlite == on_postgres
    assert {"device", "upgrade", "upgrade_event", "campaign", "schema_version", "tortoise_migrations"} <= set(on_sqlite)
    # Both say they applied every migration, and opening again applies nothing new.
    await _open_and_close(tmp_path / "unused.sqlite3", url)
    assert fetch(url, 'SELECT app, name FROM tortoise_migrations') == APPLIED
    assert fetch(url, 'SELECT version FROM schema_version') == [(4,)]
    assert not (tmp_path / "unused.sqlite3").exists()  # PostgreSQL: nothing written in the data dir


async def test_an_sqlite_database_made_before_tortoise_migrations_is_taken_over_not_recreated(tmp_path):
    """A version 4 database as otad made it before: schema_version, no tortoise_migrations. Its
    data stays, the initial migration is recorded as applied (creating its tables would fail), and
    the later ones run."""
    settings = make_settings(tmp_path / "data", **{"database.url": ""})
    async with running_otad(settings) as otad:
        await otad.add_device("dev1", 1)
        await otad.daemon.stop()
        with sqlite3.connect(settings.database_path) as conn:
            # What an otad of schema version 4 left: no record of migrations, no table of a later one.
            conn.executescript("DROP TABLE tortoise_migrations; DROP TABLE delta_patch;")
        otad.daemon = Daemon(settings)
        await otad.daemon.start()
        status, body = await otad.request("GET", "/api/v2/devices")
        assert status == 200 and [device["deviceName"] for device in body["data"]] == ["dev1"]
    with sqlite3.connect(settings.database_path) as conn:
        assert conn.execute("SELECT app, name FROM tortoise_migrations").fetchall() == APPLIED
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(4,)]


async def test_two_nodes_opening_one_new_postgresql_database_at_once_both_start(tmp_path, postgres_url):
    url = fresh_database(postgres_url)
    await asyncio.gather(_open_and_close(tmp_path / "a.sqlite3", url), _open_and_close(tmp_path / "b.sqlite3", url))
    assert fetch(url, 'SELECT app, name FROM tortoise_migrations') == APPLIED


def _otad(data_dir: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otad", *args, "--data-dir", str(data_dir), "--database-url", url],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


async def test_an_operators_day_on_postgresql_with_admin_commands_on_the_same_database(tmp_path, postgres_url):
    url = fresh_database(postgres_url)
    added = await asyncio.to_thread(_otad, tmp_path / "cli", url, "device", "add", "dev1", "--product-id", "7")
    assert added.returncode == 0, added.stderr
    password = added.stdout.strip().splitlines()[-1]
    assert "postgres://postgres@127.0.0.1" in added.stderr  # it says which database it used
    settings = make_settings(tmp_path / "node", **{"database.url": url})
    async with running_otad(settings) as otad:
        status, body = await otad.upload("fw", 7, b"image-2.0")
        assert status == 200, body
        device = otad.device("dev1", password)
        assert await device.connect() == 0  # the password the command printed, from PostgreSQL
        assert await device.subscribe("/oc/devices/dev1/sys/ota") == [1]
        status, body = await otad.enable("fw", "dev1")
        assert status == 200, body
        version = json.loads((await device.next_message()).payload)["version"]
        for state in ("downloading", "downloaded", "verified", "updating", "updated"):
            await device.publish("/oc/devices/dev1/sys/ota/report", json.dumps({"version": version, "status": state}))
        await device.close()

        async def updated() -> bool:
            status, body = await otad.request("GET", f"/api/v2/upgrades/{version}")
            return body["data"]["state"] == "updated"

        deadline = asyncio.get_running_loop().time() + 10
        while not await updated():
            assert asyncio.get_running_loop().time() < deadline, "the reports were not applied"
            await asyncio.sleep(0.1)
        status, body = await otad.request("GET", f"/api/v2/upgrades/{version}")
        timeline = body["data"]["timeline"]
        assert [entry["state"] for entry in timeline] == [
            "created", "notified", "downloading", "downloaded", "verified", "updating", "updated"]
        upgrade = await otad.daemon.services.upgrades.get(version)
        assert upgrade.created_at.tzinfo is not None and upgrade.finished_at >= upgrade.created_at  # tz-aware
        page = await otad.daemon.services.fleet.devices(text="DEV1")  # a part of the name, any case, as SQLite
        assert [device.name for device in page.items] == ["dev1"]
        # An admin command beside the running daemon writes where it reads: its token works at once.
        made = await asyncio.to_thread(_otad, tmp_path / "cli", url, "token", "create", "ops")
        assert made.returncode == 0, made.stderr
        status, _ = await otad.request("GET", "/api/v2/devices", auth=False,
                                       headers={"Authorization": f"Bearer {made.stdout.strip().splitlines()[-1]}"})
        assert status == 200
    assert db_query(settings, 'SELECT state FROM upgrade') == [("updated",)]
