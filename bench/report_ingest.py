"""Device reports into a real `otad serve`: burst throughput beside the storage floor, and what an
idle N-device campaign costs while it waits on its devices. Not a test: it prints figures.

    .venv/bin/python bench/report_ingest.py --devices 10000 --runs 3

Each run, fresh data dir: N devices registered in one POST, a small package uploaded, N raw MQTT
devices connected (paced) on their command and report_reply topics, a one-stage campaign until each
holds its command. While the campaign waits: daemon CPU (/proc/PID/stat) over 5 s unpolled and 10 s
beside a /healthz poll every 20 ms (own process), with p50/p99. The burst: each device pipelines its
five statuses (QoS 1); first PUBLISH to last PUBACK (PUBACK = committed), /healthz p99 meanwhile,
states read back from the SQLite file and the API. The floor: bare sqlite3, the same 5N timeline
rows + 5N updates by primary key, one transaction, WAL + synchronous=FULL. Medians of --runs.
Loopback only; every process started is stopped by its PID.

    .venv/bin/python bench/report_ingest.py --postgres     # the daemon on a throwaway PostgreSQL 15
    .venv/bin/python bench/report_ingest.py --database-url postgres://user@host:5432

With PostgreSQL each run's daemon gets a fresh database on that server and the states are read back
from it; the floor stays bare sqlite3's (the same machine's reference).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.broker_fanout import raise_fd_limit  # noqa: E402
from bench.common import free_port  # noqa: E402
from bench.fleet import Device  # noqa: E402
from bench.http_bench import wait_http  # noqa: E402
from otad.config import load_settings, redact_url  # noqa: E402
from tests.conftest import db_query  # noqa: E402
from tests.postgres import fresh_database, running_postgres  # noqa: E402
from tests.rawmqtt import publish_packet, subscribe_packet  # noqa: E402

STATUSES = (("downloading", 50), ("downloaded", 100), ("verified", 100), ("updating", 100), ("updated", 100))
OTAD = [sys.executable, "-m", "otad"]
TICK = os.sysconf("SC_CLK_TCK")
POLLER = r'''
import asyncio, json, sys, time, aiohttp
async def main(url, every):
    lat, errors, stop = [], 0, asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        print("ready", flush=True)
        while not stop.is_set():
            started = time.perf_counter()
            try:
                async with session.get(url) as response:
                    errors += (await response.read(), response.status)[1] != 200
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - started)
            await asyncio.sleep(max(0.0, every - lat[-1]))
    print(json.dumps({"lat": lat, "errors": errors}))
asyncio.run(main(sys.argv[1], float(sys.argv[2])))
'''


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


async def cpu_percent(pid: int, seconds: float) -> float:
    """The process's CPU over the next ``seconds``, in % of one core."""
    cpu, started = cpu_seconds(pid), time.perf_counter()
    await asyncio.sleep(seconds)
    return 100 * (cpu_seconds(pid) - cpu) / (time.perf_counter() - started)


def ms(latencies: list[float], q: int) -> float:  # q-th percentile of seconds, in ms
    return 1000 * statistics.quantiles(latencies, n=100, method="inclusive")[q - 1]


class Reporter(Device):
    """A device: takes its command, PUBACKs what it gets, sends its five reports in one write."""

    def __init__(self, bench: "Bench", name: str, password: str) -> None:
        super().__init__(bench, name, name, password, f"/oc/devices/{name}/sys/ota")
        self.bench, self.burst = bench, b""
        self.report_topic = f"/oc/devices/{name}/sys/ota/report"

    def on_packet(self, kind: int, flags: int, body: bytes) -> None:
        bench = self.bench
        if kind == 4:  # PUBACK of a report: committed
            bench.pubacks += 1
            bench.last_puback = time.perf_counter()
        elif kind == 3:  # PUBLISH: a command or a report_reply
            (topic_length,) = struct.unpack("!H", body[:2])
            topic, rest = body[2:2 + topic_length], body[2 + topic_length:]
            if (flags >> 1) & 3:
                self.transport.write(b"\x40\x02" + rest[:2])
                rest = rest[2:]
            if topic.endswith(b"/report_reply"):
                bench.on_reply(rest)
            elif not self.burst:
                version = json.loads(rest)["version"]
                self.burst = b"".join(publish_packet(self.report_topic, json.dumps(
                    {"version": version, "status": status, "progress": progress}).encode(), 1, i + 1)
                    for i, (status, progress) in enumerate(STATUSES))
                bench.commands += 1
        elif kind == 2:  # CONNACK
            if body[1] != 0:
                self.subscribed.set_exception(RuntimeError(f"CONNACK {body[1]}"))
                return
            self.transport.write(subscribe_packet(1, [(self.topic, 1), (self.topic + "/report_reply", 1)]))
        elif kind == 9 and not self.subscribed.done():  # SUBACK
            self.subscribed.set_result(bytes(body[2:]))

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.bench.lost += 1


class Bench:
    """The fleet's counters (``loop`` for bench.fleet.Device)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.devices: list[Reporter] = []
        self.commands = self.pubacks = self.lost = self.accepted = 0
        self.last_puback = 0.0
        self.refusals: Counter[str] = Counter()

    def on_reply(self, payload: bytes) -> None:
        reply = json.loads(payload)
        if reply.get("accepted"):
            self.accepted += 1
        else:
            self.refusals[str(reply.get("errorMsg"))] += 1

    async def connect_all(self, port: int, passwords: dict[str, str], in_flight: int = 256) -> None:
        """Connect every device, at most ``in_flight`` handshakes at a time (paced SYNs)."""
        gate = asyncio.Semaphore(in_flight)

        async def one(name: str) -> None:
            async with gate:
                device = Reporter(self, name, passwords[name])
                await self.loop.create_connection(lambda: device, "127.0.0.1", port)
                self.devices.append(device)
                codes = await asyncio.wait_for(device.subscribed, 30)
                assert codes == b"\x01\x01", f"{name}: SUBACK {codes!r}"
        failures = [e for e in await asyncio.gather(*(one(name) for name in passwords), return_exceptions=True) if e]
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(passwords)} devices did not connect, first: {failures[0]!r}")

    async def until(self, done, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not done() and time.perf_counter() < deadline:
            await asyncio.sleep(0.02)
        return done()


async def start_poller(url: str, started: list[subprocess.Popen]) -> subprocess.Popen:
    """/healthz every 20 ms from its own process (this one's loop is busy being the devices)."""
    started.append(subprocess.Popen([sys.executable, "-c", POLLER, url, "0.02"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True))
    assert (await asyncio.to_thread(started[-1].stdout.readline)).strip() == "ready"
    return started[-1]


async def stop_poller(poller: subprocess.Popen) -> dict:
    return json.loads((await asyncio.to_thread(poller.communicate, "stop\n", 60))[0])


def storage_floor(workdir: Path, n: int) -> float:
    """Rows/s of a bare sqlite3 write of 5N timeline rows + 5N upgrade updates, committed once."""
    db = sqlite3.connect(workdir / "floor.sqlite3", isolation_level=None)
    db.executescript("""PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
        CREATE TABLE upgrade (id INTEGER PRIMARY KEY, version TEXT UNIQUE, device_id INT, campaign_id INT,
                              state TEXT, progress INT, updated_at TEXT);
        CREATE INDEX up_dev ON upgrade (device_id, state); CREATE INDEX up_camp ON upgrade (campaign_id, state);
        CREATE TABLE upgrade_event (id INTEGER PRIMARY KEY, upgrade_id INT, at TEXT, state TEXT, source TEXT,
                                    detail TEXT);
        CREATE INDEX ev_up ON upgrade_event (upgrade_id, id);""")
    with db:  # the upgrades the reports move (not timed)
        db.execute("BEGIN")
        db.executemany("INSERT INTO upgrade VALUES (?, ?, ?, 1, 'notified', NULL, NULL)",
                       [(i, f"{i:036d}", i) for i in range(1, n + 1)])
    now = datetime.now(timezone.utc).isoformat()
    events = [(i, now, s, "device", None) for i in range(1, n + 1) for s, _ in STATUSES]
    updates = [(s, p, now, i) for i in range(1, n + 1) for s, p in STATUSES]
    started = time.perf_counter()
    db.execute("BEGIN")
    db.executemany("INSERT INTO upgrade_event (upgrade_id, at, state, source, detail) VALUES (?, ?, ?, ?, ?)", events)
    db.executemany("UPDATE upgrade SET state = ?, progress = ?, updated_at = ? WHERE id = ?", updates)
    db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return 5 * n / elapsed


def start_daemon(workdir: Path, url: str = "") -> tuple[subprocess.Popen, str, str, int]:
    """`otad serve` on free loopback ports (on PostgreSQL at ``url`` if given), with an API token;
    its log goes to workdir/otad.log."""
    data, http_port, mqtt_port = workdir / "otad", free_port(), free_port()
    created = subprocess.run(OTAD + ["token", "create", "bench", "--data-dir", str(data)], capture_output=True,
                             text=True, env={**os.environ, "OTAD_DATABASE_URL": url})
    if created.returncode:
        raise RuntimeError(f"otad token create failed: {created.stderr.strip()}")
    token = created.stdout.splitlines()[-1]
    # A few HTTP connections are enough here; left to its share of the open-file limit (a hard
    # limit of 20,000 on some machines) HTTP would take half and leave MQTT fewer than 10,000.
    env = {**os.environ, "OTAD_HTTP_MAX_CONNECTIONS": "256", "OTAD_DATABASE_URL": url}
    with open(workdir / "otad.log", "wb") as log_file:
        daemon = subprocess.Popen(OTAD + ["serve", "--data-dir", str(data), "--http-host", "127.0.0.1", "--http-port",
                                          str(http_port), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port),
                                          "--log-level", "warning"], env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit)
    return daemon, token, f"http://127.0.0.1:{http_port}", mqtt_port


async def run_one(workdir: Path, n: int, url: str = "") -> dict:
    daemon, token, base, mqtt_port = start_daemon(workdir, url)
    bench, pid, pollers, r = Bench(), daemon.pid, [], {"load1_at_start": os.getloadavg()[0]}
    try:
        async with aiohttp.ClientSession(headers={"Authorization": token}) as http:
            async def api(method: str, path: str, **kwargs) -> object:
                async with http.request(method, base + path, **kwargs) as response:
                    body = await response.json(content_type=None)
                    assert isinstance(body, dict) and body.get("success"), f"{method} {path}: {response.status} {body}"
                    return body["data"]
            await asyncio.to_thread(wait_http, base + "/healthz")
            started = time.perf_counter()
            added = await api("POST", "/api/v2/devices", json=[{"deviceName": f"dev{i}", "productId": 1}
                                                                for i in range(n)])
            r["register_s"] = time.perf_counter() - started
            (form := aiohttp.FormData()).add_field("file", b"firmware" * 1000, filename="fw.bin")
            await api("POST", "/api/v2/otaUpload?name=fw&productId=1", data=form)
            started = time.perf_counter()
            await bench.connect_all(mqtt_port, {d["deviceName"]: d["password"] for d in added})
            r["connect_s"], started = time.perf_counter() - started, time.perf_counter()
            campaign = await api("POST", "/api/v2/campaigns", json={
                "name": "fw", "productId": 1, "stages": [100], "maxConcurrent": max(n, 1), "notifyRate": 100000})
            if not await bench.until(lambda: bench.commands >= n, 60 + n / 100):
                raise RuntimeError(f"only {bench.commands} of {n} devices got their command")
            r["notify_s"] = time.perf_counter() - started

            # The campaign waits on its devices: CPU with nothing polling, then beside the poll.
            await asyncio.sleep(2.0)
            r["idle_cpu_quiet_pct"] = await cpu_percent(pid, 5.0)
            poller = await start_poller(base + "/healthz", pollers)
            r["idle_cpu_polled_pct"] = await cpu_percent(pid, 10.0)
            polled = await stop_poller(poller)
            r["idle_healthz_p50_ms"], r["idle_healthz_p99_ms"] = ms(polled["lat"], 50), ms(polled["lat"], 99)
            r["idle_healthz_errors"] = polled["errors"]

            # The burst: every device's five reports in one write each, then wait for every PUBACK.
            poller = await start_poller(base + "/healthz", pollers)
            await asyncio.sleep(0.3)
            cpu, own, started = cpu_seconds(pid), sum(os.times()[:2]), time.perf_counter()
            for device in bench.devices:
                device.transport.write(device.burst)
            complete = await bench.until(lambda: bench.pubacks >= 5 * n, 120)
            r["burst_s"] = (bench.last_puback if complete else time.perf_counter()) - started
            r["reports_per_s"] = 5 * n / r["burst_s"] if complete else float("nan")
            r["daemon_cpu_burst_pct"] = 100 * (cpu_seconds(pid) - cpu) / r["burst_s"]
            r["client_cpu_burst_pct"] = 100 * (sum(os.times()[:2]) - own) / r["burst_s"]
            polled = await stop_poller(poller)
            r["burst_healthz_p99_ms"], r["burst_healthz_errors"] = ms(polled["lat"], 99), polled["errors"]
            await bench.until(lambda: bench.accepted + sum(bench.refusals.values()) >= 5 * n, 10)
            r["pubacks"], r["replies_accepted"], r["connections_lost"] = bench.pubacks, bench.accepted, bench.lost
            if bench.refusals:
                print(f"  refused reports: {dict(bench.refusals)}", flush=True)

            # Read back: the database (otad.config: data_dir/otad.sqlite3, or PostgreSQL) and the API.
            settings = load_settings({}, {}, {"data_dir": str(workdir / "otad"), "database.url": url})
            states = dict(db_query(settings, 'SELECT state, COUNT(*) FROM "upgrade" WHERE campaign_id = ? '
                                             'GROUP BY state', (campaign["id"],)))
            r["events"] = db_query(settings, 'SELECT COUNT(*) FROM upgrade_event e JOIN "upgrade" u '
                                             'ON u.id = e.upgrade_id WHERE u.campaign_id = ?', (campaign["id"],))[0][0]
            r["db_updated"] = states.get("updated", 0)
            page = await api("GET", f"/api/v2/upgrades?state=updated&campaign={campaign['id']}&pageSize=500")
            r["api_updated"] = page["total"]
            await asyncio.sleep(1.5)  # the engine closes the campaign at its next tick (0.5 s)
            status = await api("GET", f"/api/v2/campaigns/{campaign['id']}")
            print(f"  upgrade states in the db: {states}; campaign {status['state']}", flush=True)
    finally:
        for poller in pollers:
            if poller.poll() is None:
                poller.kill()
                poller.wait(10)
        for device in bench.devices:
            device.transport.close()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
        lines = (workdir / "otad.log").read_text(errors="replace").splitlines()
        r["log_lines"] = len(lines)
        for line in lines[:8]:
            print(f"  otad log: {line}", flush=True)
    r["floor_rows_per_s"] = storage_floor(workdir, n)
    r["ratio_otad_floor"] = r["reports_per_s"] / r["floor_rows_per_s"]
    return r


# The figures: metric -> (at least?, limit).
TARGETS = {"reports_per_s": (True, 5000), "burst_s": (False, 15), "burst_healthz_p99_ms": (False, 100),
           "idle_healthz_p99_ms": (False, 50), "idle_cpu_quiet_pct": (False, 5), "idle_cpu_polled_pct": (False, 5)}


def verdict(key: str, value: float) -> str:
    at_least, limit = TARGETS.get(key, (False, None))
    met = limit is not None and (value >= limit if at_least else value < limit)
    return "" if limit is None else f"{'>=' if at_least else '<'} {limit}: {'ok' if met else 'MISSED'}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database-url", default="", help="a PostgreSQL server's base URL: a fresh database each run")
    parser.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL 15 for the runs")
    args = parser.parse_args()
    raise_fd_limit()
    with contextlib.ExitStack() as stack:
        await runs(args, stack.enter_context(running_postgres()) if args.postgres else args.database_url)


async def runs(args, base: str) -> None:
    print(f"nproc {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}); load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.devices} devices x {len(STATUSES)} statuses; "
          f"{'PostgreSQL ' + redact_url(base) if base else 'SQLite'}", flush=True)
    results = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as workdir:
            url = await asyncio.to_thread(fresh_database, base) if base else ""
            results.append(await run_one(Path(workdir), args.devices, url))
        print(f"run {run + 1}: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in results[-1].items()), flush=True)
    print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nmedians of {args.runs} run(s), N = {args.devices}, {os.cpu_count()} CPUs")
    print("| metric | median | runs | target |\n|---|---|---|---|")
    for key in results[0]:
        values = [r[key] for r in results]
        median = statistics.median(values)
        print(f"| {key} | {median:.2f} | {' '.join(f'{v:.2f}' for v in values)} | {verdict(key, median)} |")


if __name__ == "__main__":
    asyncio.run(main())
