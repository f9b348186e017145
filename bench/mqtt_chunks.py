"""Firmware over MQTT in chunks (docs/chunks.md) against the same file over HTTP, in the same run:

  one device   a 4 MiB image fetched chunk by chunk (request, wait for the frame, next) at several
               chunk sizes, against one HTTP GET of the same file (urllib) from the same daemon
  many devices N devices fetching it at once over 32 KiB chunks: aggregate MB/s and otad's RSS growth

    python bench/mqtt_chunks.py --devices 20 --rounds 3

`otad serve` on loopback (a fresh data dir), paho-mqtt devices in threads (TCP_NODELAY set, as
docs/chunks.md advises). Prints medians.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, rss_kb  # noqa: E402

OTAD = [sys.executable, "-m", "otad"]
IMAGE_SIZE = 4 * 1024 * 1024


class Daemon:
    """`otad serve` with a token, devices dev0..devN-1, a package enabled for each of them."""

    def __init__(self, workdir: Path, devices: int, image: bytes) -> None:
        env = {**os.environ, "OTAD_DATA_DIR": str(workdir / "otad")}
        self.http, self.mqtt = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.token = self._cli(env, "token", "create", "bench")
        self.passwords = {f"dev{i}": self._cli(env, "device", "add", f"dev{i}", "--product-id", "1")
                          for i in range(devices)}
        self.process = subprocess.Popen(OTAD + ["serve", "--http-host", "127.0.0.1", "--http-port", str(self.http),
                                                "--mqtt-host", "127.0.0.1", "--mqtt-port", str(self.mqtt),
                                                "--log-level", "warning", "--chunk-max-size", "256KiB",
                                                "--chunk-transfers-per-device", "2"],
                                        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait()
        self.file_name = self._upload(image)
        for name in self.passwords:
            self._api("POST", f"/api/v2/otaEnable?name=fw&deviceName={name}")

    @staticmethod
    def _cli(env: dict, *args: str) -> str:
        return subprocess.run(OTAD + list(args), env=env, capture_output=True, text=True,
                              check=True).stdout.splitlines()[-1].split("\t")[-1]

    def _wait(self) -> None:
        for _ in range(400):
            try:
                urllib.request.urlopen(self.url + "/healthz", timeout=2).read()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("otad did not start")

    def _api(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Authorization": self.token, "Content-Type": content_type})
        return json.loads(urllib.request.urlopen(request).read())

    def _upload(self, image: bytes) -> str:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"fw.bin\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
        self._api("POST", "/api/v2/otaUpload?name=fw&productId=1", body, f"multipart/form-data; boundary={boundary}")
        return self._api("GET", "/api/v2/otaList")["data"][0]["fileName"]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


class ChunkDevice:
    """One paho device that fetches a file chunk by chunk."""

    def __init__(self, port: int, name: str, password: str) -> None:
        self.name = name
        self.frames: queue.Queue[bytes] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-bench")
        self.client.username_pw_set(name, password)
        self.client.on_message = lambda c, u, message: self.frames.put(message.payload)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect("127.0.0.1", port, 60)
        # As docs/chunks.md advises a device: without it, the PUBACK of one chunk holds the next
        # request back until otad's delayed ACK (40 ms).
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        self.client.subscribe(f"/oc/devices/{name}/sys/ota/chunk/response", 1)
        if not subscribed.wait(10):
            raise RuntimeError("no SUBACK")

    def fetch(self, file_name: str, chunk: int) -> bytes:
        data = bytearray()
        while True:
            request = {"fileName": file_name, "offset": len(data), "size": chunk}
            self.client.publish(f"/oc/devices/{self.name}/sys/ota/chunk/request", json.dumps(request), 1)
            frame = self.frames.get(timeout=30)
            (length,) = struct.unpack(">H", frame[1:3])
            header = json.loads(frame[3:3 + length])
            if not header["success"]:
                if header["data"]["reason"] == "busy":
                    continue
                raise RuntimeError(header["errorMsg"])
            data += frame[3 + length:]
            if len(data) == header["data"]["total"]:
                return bytes(data)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def one_device(daemon: Daemon, image: bytes, rounds: int) -> None:
    digest = hashlib.sha256(image).hexdigest()
    device = ChunkDevice(daemon.mqtt, "dev0", daemon.passwords["dev0"])
    http = statistics.median(timed(lambda: urllib.request.urlopen(
        f"{daemon.url}/api/v2/micro/{daemon.file_name}").read()) for _ in range(rounds))
    print(f"one device, {len(image) >> 20} MiB: HTTP GET {len(image) / http / 1e6:8.1f} MB/s (reference)")
    for chunk in (4096, 16384, 32768, 131072):
        seconds = []
        for _ in range(rounds):
            got: list[bytes] = []
            seconds.append(timed(lambda: got.append(device.fetch(daemon.file_name, chunk))))
            assert hashlib.sha256(got[0]).hexdigest() == digest
        median = statistics.median(seconds)
        print(f"  chunks of {chunk >> 10:4d} KiB: {len(image) / median / 1e6:8.1f} MB/s, "
              f"{len(image) / chunk / median:8.0f} chunks/s, HTTP {median / http:5.0f} x faster")
    device.close()


def many_devices(daemon: Daemon, image: bytes, count: int) -> None:
    devices = [ChunkDevice(daemon.mqtt, name, password) for name, password in daemon.passwords.items()]
    before = rss_kb(daemon.process.pid)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda d=d: results.append(d.fetch(daemon.file_name, 32768)))
               for d in devices]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    assert len(results) == count and all(result == image for result in results)
    print(f"{count} devices at once, 32 KiB chunks: {count * len(image) / seconds / 1e6:8.1f} MB/s in all, "
          f"{seconds:5.1f} s; otad RSS {before // 1024} -> {rss_kb(daemon.process.pid) // 1024} MiB")
    for device in devices:
        device.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    image = os.urandom(IMAGE_SIZE)
    with tempfile.TemporaryDirectory(prefix="otad-chunks-bench-") as workdir:
        daemon = Daemon(Path(workdir), max(args.devices, 1), image)
        try:
            print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
            one_device(daemon, image, args.rounds)
            many_devices(daemon, image, args.devices)
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
