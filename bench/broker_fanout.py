"""Fan-out, connect storm and memory: otad's embedded broker against Debian's mosquitto.

    python bench/broker_fanout.py --devices 10000
    python bench/broker_fanout.py --devices 50000 --rounds 1 --brokers otad   # memory at scale

Both brokers run in anonymous lab mode (``--auth`` makes otad's devices log in with passwords).
For each broker: N devices connect and subscribe to their own OTA topic, with paced SYNs (at most
``--in-flight`` handshakes open, so no accept queue overflows and no 1-second SYN retransmit hides in
the figures); then one command goes to each of the N from one external publisher client (both
brokers), and for otad a second time through the service's in-process Publisher (the path otaEnable
and campaigns take); then broker RSS is read. During otad's storm a poller measures
otaPassiveEnable latency. The devices live in this process, the brokers in their own. Medians over
--rounds; ratios are otad / mosquitto. Needs mosquitto (apt-get install mosquitto).
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




def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (/proc/PID/stat), so a broker's own work is seen
    apart from the clients' (which share this machine's CPUs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    def __init__(self, workdir: Path, anonymous: bool = True) -> None:
        self.http_port, self.port = free_port(), free_port()
        # bench/otad_driver.py, in lab mode when the devices connect anonymously (as to mosquitto).
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__)), "--serve-otad", str(workdir / "otad"),
             str(self.http_port), str(self.port), "anonymous" if anonymous else "auth"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=raise_fd_limit)
        self.anonymous = anonymous
        self.passwords: dict[str, str] | None = None

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    async def ready(self, devices: int) -> None:
        await asyncio.to_thread(self.ask, "ready")
        answer = await asyncio.to_thread(self.ask, f"register {devices}")
        if not self.anonymous:
            self.passwords = json.loads(Path(answer["passwords"]).read_text())

    async def fanout(self, count: int) -> None:
        """From an external publisher, as for mosquitto (lab mode lets it publish on any topic)."""
        await Mosquitto.fanout(self, count)  # type: ignore[arg-type]

    async def fanout_in_process(self, count: int) -> None:
        await asyncio.to_thread(self.ask, f"fanout {count}")

    def stop(self) -> None:
        try:
            self.ask("quit")
        except (BrokenPipeError, ValueError):
            pass
        self.process.wait(30)


def serve_otad(data_dir: str, http_port: str, mqtt_port: str, mode: str) -> None:
    """bench/otad_driver.py, with mqtt.allow_anonymous on in ``anonymous`` mode."""
    from bench import otad_driver

    if mode == "anonymous":
        load = otad_driver.load_settings
        otad_driver.load_settings = lambda document, env, flags: load(document, env, {**flags,
                                                                                      "mqtt.allow_anonymous": True})
    sys.argv = [otad_driver.__file__, data_dir, http_port, mqtt_port]
    asyncio.run(otad_driver.main())


async def run_one(broker, devices: int, in_flight: int) -> dict:
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
        # In its own process: this one's event loop is busy being the devices.
        url = f"http://127.0.0.1:{broker.http_port}/api/v2/otaPassiveEnable?deviceName=dev0"
        poller = subprocess.Popen([sys.executable, str(Path(__file__).parent / "http_poller.py"), url],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        await asyncio.sleep(0.5)
    started, cpu = time.perf_counter(), cpu_seconds(broker.process.pid)
    await fleet.connect_all(names, broker.passwords, in_flight)
    connect_seconds = time.perf_counter() - started
    connect_cpu = cpu_seconds(broker.process.pid) - cpu
    if poller:
        output, _ = await asyncio.to_thread(poller.communicate, "stop\n", 30)
        latencies = json.loads(output)
    await asyncio.sleep(1.0)
    idle_rss = rss_kb(broker.process.pid)
    result = {"connect_s": connect_seconds, "connect_cpu_s": connect_cpu}

    async def timed(send) -> tuple[float, float]:
        done = fleet.expect(devices)
        began, cpu_began = time.perf_counter(), cpu_seconds(broker.process.pid)
        await send(devices)
        await asyncio.wait_for(done, 300)
        return time.perf_counter() - began, cpu_seconds(broker.process.pid) - cpu_began

    if not isinstance(broker, Otad) or broker.anonymous:  # with --auth no outside client may publish commands
        result["fanout_s"], result["fanout_cpu_s"] = await timed(broker.fanout)
    if isinstance(broker, Otad):
        result["fanout_in_process_s"], result["fanout_in_process_cpu_s"] = await timed(broker.fanout_in_process)
    result["rss_per_device_kb"] = (idle_rss - base_rss) / devices
    result["rss_mb"] = idle_rss / 1024
    fleet.close()
    if latencies:
        latencies.sort()
        result["http_p99_ms"] = latencies[int(len(latencies) * 0.99) - 1] * 1000 if len(latencies) > 1 else 0.0
        result["http_requests"] = len(latencies)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=64, help="handshakes open at a time (SYN pacing)")
    parser.add_argument("--brokers", default="mosquitto,otad")
    parser.add_argument("--auth", action="store_true", help="otad's devices log in (mosquitto stays anonymous)")
    args = parser.parse_args()
    raise_fd_limit()
    kinds = [{"mosquitto": Mosquitto, "otad": Otad}[name] for name in args.brokers.split(",")]
    results: dict[str, list[dict]] = {kind.name: [] for kind in kinds}
    for round_number in range(args.rounds):
        for kind in kinds:
            with tempfile.TemporaryDirectory() as workdir:
                broker = kind(Path(workdir)) if kind is Mosquitto else kind(Path(workdir), not args.auth)
                try:
                    result = await run_one(broker, args.devices, args.in_flight)
                finally:
                    broker.stop()
                results[broker.name].append(result)
                print(f"round {round_number + 1} {broker.name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float)
                      else f"{k}={v}" for k, v in result.items()), flush=True)

    def median(name: str, key: str) -> float | None:
        values = [r[key] for r in results.get(name, ()) if key in r]
        return statistics.median(values) if values else None

    print(f"\nN = {args.devices} devices, {args.rounds} rounds, medians; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}; SYNs paced at {args.in_flight} in flight"
          + ("; otad devices authenticated" if args.auth else "; anonymous lab mode"))
    print("| metric | otad | mosquitto | ratio otad/mosquitto |")
    print("|---|---|---|---|")
    for key, label, reference in (
            ("connect_s", "connect + subscribe all (s)", "connect_s"),
            ("connect_cpu_s", "  broker CPU for it (s)", "connect_cpu_s"),
            ("fanout_s", "one command to each, external publisher (s)", "fanout_s"),
            ("fanout_cpu_s", "  broker CPU for it (s)", "fanout_cpu_s"),
            ("fanout_in_process_s", "one command to each, in-process Publisher (s)", "fanout_s"),
            ("fanout_in_process_cpu_s", "  broker CPU for it (s)", "fanout_cpu_s"),
            ("rss_per_device_kb", "RSS per idle device (KB)", "rss_per_device_kb"),
            ("rss_mb", "RSS with every device connected (MB)", "rss_mb")):
        o, m = median("otad", key), median("mosquitto", reference)
        cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        ratio = f"{o / m:.2f}x" if o is not None and m else "-"
        print(f"| {label} | {cell(o)} | {cell(m)} | {ratio} |")
    p99 = median("otad", "http_p99_ms")
    if p99 is not None:
        print(f"| otaPassiveEnable p99 during the storm (ms) | {p99:.1f} | - | - |")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve-otad":
        serve_otad(*sys.argv[2:])
    else:
        asyncio.run(main())
