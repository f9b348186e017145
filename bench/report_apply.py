"""Reports applied per second by otad's ingestion alone (no broker, no network): the service's
batches through the store into SQLite, beside a bare SQLite insert of the same rows. Not a test.

    .venv/bin/python bench/report_apply.py --devices 10000 --runs 3

Each run, fresh database: N devices, one package, N notified upgrades (not timed); then the five
statuses of every device (5N reports, in the order a burst brings them) go through
``Reports.apply_batch`` in batches the size the ingest takes (2,000): parse, state machine, one
transaction per batch with synchronous=FULL, exactly what follows a PUBLISH before its PUBACK. The
floor is ``bench/report_ingest.py``'s: bare sqlite3, 5N timeline rows + 5N updates, one transaction.
bench/report_ingest.py measures the whole path (real daemon, 10,000 MQTT devices).
"""

from __future__ import annotations

import argparse
import asyncio
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
from otad.service.clock import utc_now  # noqa: E402
from otad.service.reports import Reports  # noqa: E402
from otad.service.upgrades import UpgradeService  # noqa: E402
from otad.store import repo, rollouts  # noqa: E402
from otad.store.database import Database  # noqa: E402
from otad.store.rollouts import NewUpgrade  # noqa: E402

STATUSES = ("downloading", "downloaded", "verified", "updating", "updated")
BATCH = 2000


class NoDevices:
    """The broker's place: commands withdrawn when an upgrade ends go nowhere here."""

    async def send_command(self, device_name: str, payload: bytes) -> None: ...
    async def keep_command(self, device_name: str, payload: bytes) -> None: ...
    async def clear_command(self, device_name: str) -> None: ...
    async def forget_device(self, device_name: str) -> None: ...


async def run_one(workdir: Path, n: int) -> dict:
    database = Database(workdir / "otad.sqlite3")
    await database.open()
    try:
        await repo.insert_devices((f"d{i}", 1, "x" * 64) for i in range(n))
        package = await repo.insert_package(product_id=1, name="fw", file_name=f"{uuid.uuid4()}.bin",
                                            original_name="fw.bin", size=1, md5="0" * 32, sha256="0" * 64,
                                            version=None, description=None)
        devices = await repo.devices_of_product(1)
        upgrades = [NewUpgrade(str(uuid.uuid4()), device_id, None) for device_id, _ in devices]
        for start in range(0, n, 500):
            await rollouts.record_upgrades(upgrades[start:start + 500], package=package, state="notified",
                                           at=utc_now(), superseded_state="superseded",
                                           open_states=["created", "notified"])
        reports = Reports(UpgradeService(None, NoDevices(), 3600))  # type: ignore[arg-type]
        items = [(name, json.dumps({"version": upgrade.version, "status": status, "progress": 100}).encode())
                 for status in STATUSES for (_, name), upgrade in zip(devices, upgrades)]
        started = time.perf_counter()
        replies = []
        for start in range(0, len(items), BATCH):
            replies += await reports.apply_batch(items[start:start + BATCH])
        elapsed = time.perf_counter() - started
        assert all(reply.accepted for reply in replies), "a report was refused"
        states = {row for row in await rollouts.count_upgrades_by_state()}
        assert states == {"updated"}, states
    finally:
        await database.close()
    floor = storage_floor(workdir, n)
    return {"reports_per_s": len(items) / elapsed, "floor_rows_per_s": floor,
            "ratio_otad_floor": len(items) / elapsed / floor}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"nproc {os.cpu_count()}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{args.devices} devices x {len(STATUSES)} statuses, batches of {BATCH}")
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="otad-apply-") as workdir:
            result = await run_one(Path(workdir), args.devices)
        results.append(result)
        print(f"run {run + 1}: " + ", ".join(f"{key}={value:.2f}" for key, value in result.items()))
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nmedians of {args.runs}:")
    for key in results[0]:
        print(f"  {key}: {statistics.median(r[key] for r in results):.2f}")


if __name__ == "__main__":
    asyncio.run(main())
