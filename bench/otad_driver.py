"""Runs one otad daemon for the benchmarks and drives its service layer on command.

Reads commands on stdin, one per line, and answers one JSON line on stdout each:
  ready                      -> {"http": port, "mqtt": port, "pid": pid}
  register N                 -> registers dev0..dev{N-1}, answers their passwords' file
  fanout N                   -> publishes one command to each of dev0..dev{N-1} through the service's
                                Publisher (what enable and campaigns call), answers the seconds taken
  enable N                   -> the whole otaEnable use case (DB row + publish) for each device
  rss                        -> {"rss_kb": resident set size}
  quit
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import rss_kb  # noqa: E402
from otad.config import load_settings  # noqa: E402
from otad.daemon import Daemon, tune_garbage_collector  # noqa: E402
from otad.service.offers import ota_command  # noqa: E402


async def main() -> None:
    data_dir, http_port, mqtt_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    settings = load_settings({}, {}, {"data_dir": data_dir, "http.host": "127.0.0.1", "http.port": http_port,
                                      "mqtt.host": "127.0.0.1", "mqtt.port": mqtt_port, "log_level": "warning",
                                      "mqtt.max_connections": "60000"})
    daemon = Daemon(settings)
    await daemon.start()
    tune_garbage_collector()  # as otad serve does
    services = daemon.services
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(value: dict) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    while line := (await reader.readline()).decode().strip():
        command, *args = line.split()
        if command == "ready":
            answer({"http": daemon.http_port, "mqtt": daemon.mqtt_port})
        elif command == "register":
            count = int(args[0])
            added = []
            for start in range(0, count, 5000):
                batch = [{"deviceName": f"dev{i}", "productId": 1} for i in range(start, min(count, start + 5000))]
                added += await services.devices.add(batch)
            path = Path(data_dir) / "passwords.json"
            path.write_text(json.dumps({device.name: device.password for device in added}))
            await services.packages.upload(name="fw", product_id=1, original_name="fw.bin",
                                           chunks=_one_chunk(b"firmware" * 1000))
            # dev0 polls otaPassiveEnable during the storm: give it something to be told.
            await services.passive.pin({"deviceName": "dev0", "name": "fw", "versionName": "1.0"})
            answer({"passwords": str(path)})
        elif command == "fanout":
            count = int(args[0])
            started = time.perf_counter()
            publisher = daemon._broker  # the service's Publisher
            for i in range(count):
                await publisher.send_command(f"dev{i}", ota_command("f.bin", f"v-{i}", "0" * 32))
            answer({"seconds": time.perf_counter() - started})
        elif command == "enable":
            count = int(args[0])
            started = time.perf_counter()
            for i in range(count):
                await services.upgrades.enable("fw", f"dev{i}")
            answer({"seconds": time.perf_counter() - started})
        elif command == "trace-start":
            import tracemalloc
            tracemalloc.start(3)
            answer({})
        elif command == "trace-top":
            import tracemalloc
            import gc as _gc
            _gc.collect()
            snapshot = tracemalloc.take_snapshot()
            stats = snapshot.statistics("lineno")
            total = sum(stat.size for stat in stats)
            answer({"total_kb": total // 1024, "top": [f"{stat.size // 1024} KB {stat.count} {stat.traceback[0]}"
                                                        for stat in stats[:30]]})
        elif command == "rss":
            answer({"rss_kb": rss_kb(os.getpid())})
        elif command == "quit":
            break
    await daemon.stop()


async def _one_chunk(data: bytes):
    yield data


if __name__ == "__main__":
    asyncio.run(main())
