"""Reports applied per second by otad's ingestion alone (no broker, no network): the service's
batches through the store into SQLite, beside a bare SQLite insert of the same rows. Not a test.

    .venv/bin/python bench/report_apply.py --devices 10000 --runs 3

Each run, fresh database: N devices, one package, N notified upgrades (not timed); then the five
statuses of every device (5N reports, in the order a burst brings them) go through
``Reports.apply_batch`` in batches the size the ingest takes (2,000): parse, state machine, one
transaction per batch with synchronous=FULL, exactly what follows a PUBLISH before its PUBACK. The
floor is ``bench/report_ingest.py``'s: bare sqlite3, 5N timeline rows + 5N updates, one transaction.
bench/report_ingest.py measures the whole path (real daemon, 10,000 MQTT devices).

    .venv/bin/python bench/report_apply.py --postgres             # a throwaway PostgreSQL 15 (tests/postgres.py)
    .venv/bin/python bench/report_apply.py --database-url postgres://user@host:5432

With PostgreSQL each run gets a fresh database on that server (otad's own writes use asyncpg); the
floor is then bare asyncpg: the same rows, executemany, one transaction (the server's settings:
the throwaway one runs with fsync off, so compare its figures with each other, not with SQLite's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report_ingest import storage_floor  # noqa: E402
from otad.config import redact_url  # noqa: E402
from otad.service.clock import utc_now  # noqa: E402
from otad.service.reports import Reports  # noqa: E402
from otad.service.upgrades import UpgradeService  # noqa: E402
from otad.model import NewUpgrade  # noqa: E402
from otad.store.database import Database  # noqa: E402
from otad.store.store import Store  # noqa: E402
from tests.postgres import fresh_database, running_postgres  # noqa: E402

STATUSES = ("downloading", "downloaded", "verified", "updating", "updated")
BATCH = 2000


class NoDevices:
    """The broker's place: commands withdrawn when an upgrade ends go nowhere here."""

    async def send_command(self, device_name: str, payload: bytes) -> None: ...
    async def keep_command(self, device_name: str, payload: bytes) -> None: ...
    async def clear_command(self, device_name: str) -> None: ...
    async def forget_device(self, device_name: str) -> None: ...


async def postgres_floor(url: str, n: int) -> float:
    """Rows/s of a bare asyncpg write of 5N timeline rows + 5N upgrade updates, committed once."""
    import asyncpg

    db = await asyncpg.connect(url)
    try:
        await db.execute("""CREATE TABLE floor_upgrade (id INT PRIMARY KEY, version TEXT UNIQUE, device_id INT,
                                campaign_id INT, state TEXT, progress INT, updated_at TIMESTAMPTZ);
            CREATE INDEX fl_dev ON floor_upgrade (device_id, state); CREATE INDEX fl_camp ON floor_upgrade (campaign_id, state);
            CREATE TABLE floor_event (id SERIAL PRIMARY KEY, upgrade_id INT, at TIMESTAMPTZ, state TEXT, source TEXT,
                                      detail TEXT);
            CREATE INDEX fl_ev ON floor_event (upgrade_id, id);""")
        await db.executemany("INSERT INTO floor_upgrade VALUES ($1, $2, $3, 1, 'notified', NULL, NULL)",
                             [(i, f"{i:036d}", i) for i in range(1, n + 1)])
        now = utc_now()
        events = [(i, now, s, "device", None) for i in range(1, n + 1) for s in STATUSES]
        updates = [(s, 100, now, i) for i in range(1, n + 1) for s in STATUSES]
        started = time.perf_counter()
        async with db.transaction():
            await db.executemany("INSERT INTO floor_event (upgrade_id, at, state, source, detail) "
                                 "VALUES ($1, $2, $3, $4, $5)", events)
            await db.executemany("UPDATE floor_upgrade SET state = $1, progress = $2, updated_at = $3 WHERE id = $4",
                                 updates)
        return 5 * n / (time.perf_counter() - started)
    finally:
        await db.close()


async def run_one(workdir: Path, n: int, url: str = "") -> dict:
    database = Database(workdir / "otad.sqlite3", url)
    await database.open()
    store = Store()
    try:
        await store.repo.insert_devices((f"d{i}", 1, "x" * 64) for i in range(n))
        package = await store.repo.insert_package(product_id=1, name="fw", file_name=f"{uuid.uuid4()}.bin",
                                                  original_name="fw.bin", size=1, md5="0" * 32, sha256="0" * 64,
                                                  version=None, description=None)
        devices = await store.repo.devices_of_product(1)
        upgrades = [NewUpgrade(str(uuid.uuid4()), device_id, None) for device_id, _ in devices]
        for start in range(0, n, 500):
            await store.rollouts.record_upgrades(upgrades[start:start + 500], package=package, state="notified",
                                                 at=utc_now(), superseded_state="superseded",
                                                 open_states=["created", "notified"])
        reports = Reports(store, UpgradeService(store, None, NoDevices(), 3600))  # type: ignore[arg-type]
        items = [(name, json.dumps({"version": upgrade.version, "status": status, "progress": 100}).encode())
                 for status in STATUSES for (_, name), upgrade in zip(devices, upgrades)]
        started = time.perf_counter()
        replies = []
        for start in range(0, len(items), BATCH):
            replies += await reports.apply_batch(items[start:start + BATCH])
        elapsed = time.perf_counter() - started
        assert all(reply.accepted for reply in replies), "a report was refused"
        states = {row for row in await store.rollouts.count_upgrades_by_state()}
        assert states == {"updated"}, states
    finally:
        await database.close()
    floor = await postgres_floor(url, n) if url else storage_floor(workdir, n)
    return {"reports_per_s": len(items) / elapsed, "floor_rows_per_s": floor,
            "ratio_otad_floor": len(items) / elapsed / floor}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", default="", help="a PostgreSQL server's base URL: a fresh database each run")
    parser.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL 15 for the runs")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(running_postgres()) if args.postgres else args.database_url
        await runs(args, base)


async def runs(args, base: str) -> None:
    print(f"nproc {os.cpu_count()}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{args.devices} devices x {len(STATUSES)} statuses, batches of {BATCH}; "
          f"{'PostgreSQL ' + redact_url(base) if base else 'SQLite'}")
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="otad-apply-") as workdir:
            url = await asyncio.to_thread(fresh_database, base) if base else ""
            result = await run_one(Path(workdir), args.devices, url)
        results.append(result)
        print(f"run {run + 1}: " + ", ".join(f"{key}={value:.2f}" for key, value in result.items()))
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nmedians of {args.runs}:")
    for key in results[0]:
        print(f"  {key}: {statistics.median(r[key] for r in results):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
