"""HTTP speed against references measured in the same run (wrk as the load generator):

  downloads  200 concurrent clients fetching a 16 MB firmware: otad vs nginx serving the same file
  polls      otaPassiveEnable at 64 concurrent connections vs a bare aiohttp handler, same bytes
  upload     a 1 GiB upload (curl, multipart) vs cp of the same file; daemon RSS growth

    apt-get install nginx-light wrk curl
    python bench/http_bench.py [downloads] [polls] [upload] --seconds 10 --rounds 3

Loopback only; each run is bounded by --seconds. Prints medians and ratios otad / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, rss_kb  # noqa: E402
OTAD = [sys.executable, "-m", "otad"]




def wait_http(url: str) -> None:
    for _ in range(200):
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def wrk(url: str, connections: int, seconds: int) -> dict:
    """Requests/s, bytes/s and p99 latency (ms) from wrk --latency."""
    out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency", url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    size, unit = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out).groups()
    p99_value, p99_unit = re.search(r"99%\s+([\d.]+)(\w+)", out).groups()
    p99_ms = float(p99_value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[p99_unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} error responses\n{out}")
    return {"rps": rps, "bytes_s": float(size) * _UNITS[unit.upper()], "p99_ms": p99_ms}


class Daemon:
    """`otad serve` with a token, a device dev0 and a firmware package."""

    def __init__(self, workdir: Path, firmware: Path | None) -> None:
        self.data = workdir / "otad"
        self.http = free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        env = {**os.environ, "OTAD_DATA_DIR": str(self.data)}
        self.token = subprocess.run(OTAD + ["token", "create", "bench"], env=env, capture_output=True, text=True,
                                    check=True).stdout.splitlines()[-1]
        subprocess.run(OTAD + ["device", "add", "dev0", "--product-id", "1"], env=env, capture_output=True,
                       check=True)
        self.process = subprocess.Popen(OTAD + ["serve", "--http-host", "127.0.0.1", "--http-port", str(self.http),
                                                "--mqtt-host", "127.0.0.1", "--mqtt-port", str(free_port()),
                                                "--log-level", "warning", "--max-upload-size", "2GiB"],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.url + "/healthz")
        self.file_name = None
        if firmware is not None:
            self.file_name = self.upload(firmware, "fw")["fileName"]

    def upload(self, path: Path, name: str) -> dict:
        out = subprocess.run(["curl", "-sS", "-H", f"Authorization: {self.token}", "--form", f"file=@{path}",
                              f"{self.url}/api/v2/otaUpload?name={name}&productId=1"], capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)["data"]

    def api(self, method: str, path: str, body: dict) -> None:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method=method,
                                         headers={"Authorization": self.token, "Content-Type": "application/json"})
        urllib.request.urlopen(request).read()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def bench_downloads(workdir: Path, seconds: int) -> dict:
    firmware = workdir / "fw.bin"
    firmware.write_bytes(os.urandom(16 * 1024 * 1024))
    daemon = Daemon(workdir, firmware)
    nginx_port = free_port()
    served = workdir / "www"
    served.mkdir()
    shutil.copy(firmware, served / daemon.file_name)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""daemon off; worker_processes 2; user root; pid {workdir}/nginx.pid; error_log stderr error;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on;
  server {{ listen 127.0.0.1:{nginx_port}; root {served}; }} }}
""")
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir)], stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{nginx_port}/{daemon.file_name}")
        rss_before = rss_kb(daemon.process.pid)
        otad = wrk(f"{daemon.url}/api/v2/micro/{daemon.file_name}", 200, seconds)
        rss_after = rss_kb(daemon.process.pid)
        reference = wrk(f"http://127.0.0.1:{nginx_port}/{daemon.file_name}", 200, seconds)
    finally:
        nginx.terminate()
        nginx.wait(10)
        daemon.stop()
    return {"otad_MBps": otad["bytes_s"] / 2**20, "nginx_MBps": reference["bytes_s"] / 2**20,
            "ratio": otad["bytes_s"] / reference["bytes_s"], "otad_p99_ms": otad["p99_ms"],
            "nginx_p99_ms": reference["p99_ms"], "rss_growth_MB": (rss_after - rss_before) / 1024}


_BARE_HANDLER = '''
import sys
from aiohttp import web
body = open(sys.argv[2], "rb").read()
async def handler(request):
    return web.Response(body=body, content_type="application/json")
app = web.Application()
app.router.add_get("/api/v2/otaPassiveEnable", handler)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
'''


def bench_polls(workdir: Path, seconds: int) -> dict:
    firmware = workdir / "fw.bin"
    firmware.write_bytes(b"firmware" * 1000)
    daemon = Daemon(workdir, firmware)
    daemon.api("POST", "/api/v2/otaPassive", {"deviceName": "dev0", "name": "fw", "versionName": "1.8",
                                              "description": "bench"})
    url = f"{daemon.url}/api/v2/otaPassiveEnable?deviceName=dev0"
    answer = workdir / "answer.json"
    answer.write_bytes(urllib.request.urlopen(url).read())
    bare_port = free_port()
    script = workdir / "bare.py"
    script.write_text(_BARE_HANDLER)
    bare = subprocess.Popen([sys.executable, str(script), str(bare_port), str(answer)])
    try:
        wait_http(f"http://127.0.0.1:{bare_port}/api/v2/otaPassiveEnable")
        otad = wrk(url, 64, seconds)
        reference = wrk(f"http://127.0.0.1:{bare_port}/api/v2/otaPassiveEnable?deviceName=dev0", 64, seconds)
    finally:
        bare.terminate()
        bare.wait(10)
        daemon.stop()
    return {"otad_rps": otad["rps"], "bare_aiohttp_rps": reference["rps"], "ratio": otad["rps"] / reference["rps"],
            "otad_p99_ms": otad["p99_ms"], "bare_p99_ms": reference["p99_ms"]}


def bench_upload(workdir: Path, size_mb: int) -> dict:
    source = workdir / "big.bin"
    with open(source, "wb") as out:
        for _ in range(size_mb):
            out.write(os.urandom(1024 * 1024))
    started = time.perf_counter()
    shutil.copyfile(source, workdir / "copy.bin")
    os.sync()
    cp_seconds = time.perf_counter() - started
    (workdir / "copy.bin").unlink()
    daemon = Daemon(workdir, None)
    try:
        rss_before, peak = rss_kb(daemon.process.pid), 0
        uploader = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-H", f"Authorization: {daemon.token}",
                                     "--form", f"file=@{source}", f"{daemon.url}/api/v2/otaUpload?name=big&productId=1"])
        started = time.perf_counter()
        while uploader.poll() is None:
            peak = max(peak, rss_kb(daemon.process.pid))
            time.sleep(0.05)
        upload_seconds = time.perf_counter() - started
    finally:
        daemon.stop()
    return {"size_MB": size_mb, "otad_s": upload_seconds, "cp_s": cp_seconds,
            "ratio_throughput": cp_seconds / upload_seconds, "rss_growth_MB": (peak - rss_before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description="otad HTTP benchmarks against nginx, bare aiohttp and cp")
    parser.add_argument("which", nargs="*", default=["downloads", "polls", "upload"])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upload-mb", type=int, default=1024)
    args = parser.parse_args()
    for name in args.which:
        results = []
        for round_number in range(args.rounds):
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as workdir:
                runner = {"downloads": lambda: bench_downloads(Path(workdir), args.seconds),
                          "polls": lambda: bench_polls(Path(workdir), args.seconds),
                          "upload": lambda: bench_upload(Path(workdir), args.upload_mb)}[name]
                result = runner()
            results.append(result)
            print(f"{name} round {round_number + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in result.items()),
                  flush=True)
        medians = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(f"{name} median of {args.rounds}: " + ", ".join(f"{k}={v:.3f}" for k, v in medians.items()), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
