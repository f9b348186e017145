"""Fan-out, connect storm and memory: otad's embedded broker against Debian's mosquitto.

    python bench/broker_fanout.py --devices 10000

For each broker: N devices connect at once and subscribe to their own OTA topic (connect storm),
then one command goes to each of the N (fan-out; for otad through the service's Publisher, the path
otaEnable and campaigns take, for mosquitto from one publisher client), then broker RSS is read.
During otad's storm a poller measures otaPassiveEnable latency. Medians over --rounds; ratios are
otad / mosquitto. Needs mosquitto (apt-get install mosquitto). Loopback only, bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, rss_kb  # noqa: E402
from bench.fleet import Fleet  # noqa: E402
from tests.rawmqtt import RawClient, publish_packet  # noqa: E402




def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Mosquitto:
    name = "mosquitto"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        config = workdir / "mosquitto.conf"
        config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n"
                          "persistence false\nlog_type error\nmax_queued_messages 100000\n")
        self.process = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(config)],
                                        preexec_fn=raise_fd_limit, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.passwords = None

    async def ready(self) -> None:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    async def fanout(self, count: int) -> None:
        publisher = RawClient(self.port)
        await publisher.connect("bench-publisher")
        for i in range(count):
            publisher.send(publish_packet(f"/oc/devices/dev{i}/sys/ota", b'{"fileName":"f.bin"}', qos=1,
                                          packet_id=i % 65535 + 1))
        await publisher.writer.drain()
        self._publisher = publisher

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Otad:
    name = "otad"

    def __init__(self, workdir: Path) -> None:
        self.http_port, self.port = free_port(), free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "otad_driver.py"), str(workdir / "otad"),
             str(self.http_port), str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.passwords: dict[str, str] | None = None

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    async def ready(self, devices: int) -> None:
        await asyncio.to_thread(self.ask, "ready")
        answer = await asyncio.to_thread(self.ask, f"register {devices}")
        self.passwords = json.loads(Path(answer["passwords"]).read_text())

    async def fanout(self, count: int) -> None:
        await asyncio.to_thread(self.ask, f"fanout {count}")

    def stop(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, ValueError):
            pass
        self.process.wait(30)


async def run_one(broker, devices: int) -> dict:
    names = [f"dev{i}" for i in range(devices)]
    if isinstance(broker, Otad):
        await broker.ready(devices)
    else:
        await broker.ready()
    base_rss = rss_kb(broker.process.pid)
    fleet = Fleet(broker.port)
    latencies: list[float] = []
    poller = None
    if isinstance(broker, Otad):
        # In its own process: this one's event loop is busy being ten thousand devices.
        url = f"http://127.0.0.1:{broker.http_port}/api/v2/otaPassiveEnable?deviceName=dev0"
        poller = subprocess.Popen([sys.executable, str(Path(__file__).parent / "http_poller.py"), url],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        await asyncio.sleep(0.5)
    started = time.perf_counter()
    await fleet.connect_all(names, broker.passwords)
    connect_seconds = time.perf_counter() - started
    if poller:
        output, _ = await asyncio.to_thread(poller.communicate, "stop\n", 30)
        latencies = json.loads(output)
    await asyncio.sleep(1.0)
    idle_rss = rss_kb(broker.process.pid)

    done = fleet.expect(devices)
    started = time.perf_counter()
    await broker.fanout(devices)
    await asyncio.wait_for(done, 300)
    fanout_seconds = time.perf_counter() - started
    fleet.close()
    result = {"connect_s": connect_seconds, "fanout_s": fanout_seconds,
              "rss_per_device_kb": (idle_rss - base_rss) / devices}
    if latencies:
        latencies.sort()
        result["http_p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000 if len(latencies) > 1 else 0.0
        result["http_requests"] = len(latencies)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    raise_fd_limit()
    results: dict[str, list[dict]] = {"mosquitto": [], "otad": []}
    for round_number in range(args.rounds):
        for kind in (Mosquitto, Otad):
            with tempfile.TemporaryDirectory() as workdir:
                broker = kind(Path(workdir))
                try:
                    result = await run_one(broker, args.devices)
                finally:
                    broker.stop()
                results[broker.name].append(result)
                print(f"round {round_number + 1} {broker.name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float)
                      else f"{k}={v}" for k, v in result.items()), flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"\nN = {args.devices} devices, {args.rounds} rounds, medians; {os.cpu_count()} CPUs")
    print("| metric | otad | mosquitto | ratio otad/mosquitto |")
    print("|---|---|---|---|")
    for key, label in (("connect_s", "connect + subscribe all (s)"), ("fanout_s", "one command to each (s)"),
                       ("rss_per_device_kb", "RSS per idle device (KB)")):
        o, m = median("otad", key), median("mosquitto", key)
        print(f"| {label} | {o:.3f} | {m:.3f} | {o / m:.1f}x |" if m else f"| {label} | {o:.3f} | {m:.3f} | - |")
    print(f"| otaPassiveEnable p99 during the storm (ms) | {median('otad', 'http_p99_ms'):.1f} | - | - |")


if __name__ == "__main__":
    asyncio.run(main())
