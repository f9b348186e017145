"""Nobody without credentials exhausts the HTTP side: idle and slow sockets, compressed bodies,
client-chosen cache keys; and the protocol edges (ranges, extra parts, request ids, aborted
uploads, shutdown during a download)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.conftest import free_port, make_settings, start_otad
from tests.helpers import assert_error, wait_for_port
from tests.rawmqtt import RawClient


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _healthz(url: str) -> int:
    async with aiohttp.ClientSession() as http:  # a fresh connection each time
        async with http.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=10)) as response:
            return response.status


def _limit_files():
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


async def test_idle_sockets_beyond_the_file_limit_do_not_lock_out_devices_or_healthz(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2500:
        pytest.skip(f"this test needs 2,500 open files for its own 1,100 sockets (hard limit {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2500), hard))
    http_port, mqtt_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "otad", "serve", "--data-dir", str(tmp_path), "--http-host", "127.0.0.1",
         "--http-port", str(http_port), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=_limit_files)
    idle: list[socket.socket] = []
    try:
        await wait_for_port(http_port, process)
        password = subprocess.run([sys.executable, "-m", "otad", "device", "add", "dev1", "--product-id", "1",
                                   "--data-dir", str(tmp_path)], capture_output=True, text=True,
                                  timeout=60).stdout.strip().splitlines()[-1]
        for i in range(1100):  # connect and send nothing (or only empty lines), as an attacker would
            sock = socket.create_connection(("127.0.0.1", http_port))
            if i % 2:
                sock.sendall(b"\r\n\r\n")
            idle.append(sock)
        await asyncio.sleep(0.5)
        assert await _healthz(f"http://127.0.0.1:{http_port}") == 200
        device = RawClient(mqtt_port)
        assert (await device.connect("dev1", "dev1", password))[1] == 0
        await device.close()
        assert await _healthz(f"http://127.0.0.1:{http_port}") == 200
    finally:
        for sock in idle:
            sock.close()
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert "Too many open files" not in stderr
    assert "open-file limit 1024" in stderr  # the limit is logged at start


async def test_a_trickled_request_head_is_cut_off(tmp_path):
    otad = await start_otad(make_settings(tmp_path / "data", **{"http.head_timeout": 1.0}))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", otad.daemon.http_port)
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        closed = False
        for _ in range(40):  # a header byte every 0.1 s: never a complete head
            writer.write(b"X")
            await asyncio.sleep(0.1)
            if reader.at_eof() or writer.is_closing():
                closed = True
                break
            try:
                data = await asyncio.wait_for(reader.read(1), 0.01)
                if data == b"":
                    closed = True
                    break
            except (asyncio.TimeoutError, TimeoutError):
                pass
            except ConnectionError:
                closed = True
                break
        writer.close()
        assert closed, "a head trickled for 4 s was still being read"
        assert await _healthz(otad.url) == 200
    finally:
        await otad.stop()


async def test_compressed_bodies_are_refused_unread(otad):
    bomb = gzip.compress(b'{"username": "' + b"a" * (16 * 1024 * 1024) + b'"}')
    assert len(bomb) < 64 * 1024
    before = _rss_mb()
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}

    async def send(path: str) -> tuple[int, dict]:
        extra = {"Device-Id": "aa:bb:cc:dd:ee:ff", "Client-Id": "c"} if "xiaozhi" in path else {}
        return await otad.request("POST", path, auth=False, data=bomb, headers={**headers, **extra})

    sending = asyncio.gather(*(send(path) for path in ["/api/v2/login", "/xiaozhi/ota/"] * 8))
    started = time.monotonic()
    assert await _healthz(otad.url) == 200
    healthz_seconds = time.monotonic() - started
    replies = await sending
    for status, body in replies:
        assert status == 415, body
        assert body["errorCode"] == 1001 and "Content-Encoding" in body["errorMsg"]
    assert _rss_mb() - before < 100
    assert healthz_seconds < 1.0  # the bound; it was 8.5 s when the bodies were inflated
    # A corrupt body that claims to be plain JSON is a 400, not a 500.
    status, body = await otad.request("POST", "/api/v2/login", auth=False, data=b"\x1f\x8b\x08garbage",
                                      headers={"Content-Type": "application/json"})
    assert_error(status, body, 400, 1001)


async def test_a_compressed_upload_is_refused_and_leaves_nothing(otad):
    form = aiohttp.FormData()
    form.add_field("file", gzip.compress(b"x" * 100_000), filename="fw.bin")
    status, body = await otad.request("POST", "/api/v2/otaUpload", params={"name": "fw", "productId": "1"},
                                      data=form, headers={"Content-Encoding": "gzip"})
    assert_error(status, body, 415, 1001)
    assert otad.db_rows("package") == 0 and otad.firmware_files() == []


async def test_bulk_registration_takes_a_larger_body_than_login(otad):
    devices = [{"deviceName": f"device-{i:05d}", "productId": 1} for i in range(5000)]
    body = json.dumps(devices).encode()
    assert len(body) > 64 * 1024
    status, reply = await otad.request("POST", "/api/v2/devices", data=body,
                                       headers={"Content-Type": "application/json"})
    assert status == 200 and len(reply["data"]) == 5000
    status, reply = await otad.request("POST", "/api/v2/login", auth=False, data=body,
                                       headers={"Content-Type": "application/json"})
    assert_error(status, reply, 413, 1001)


async def test_poll_cache_is_keyed_by_device_not_by_host_header(otad):
    await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"image")
    status, _ = await otad.request("POST", "/api/v2/otaPassive",
                                   json={"deviceName": "dev1", "name": "fw", "versionName": "1.0", "description": "d"})
    assert status == 200
    status, body = await otad.request("GET", "/api/v2/otaPassiveEnable", auth=False, params={"deviceName": "dev1"},
                                      headers={"Host": 'gw.example:8080'})
    assert body["data"]["url"].startswith("http://gw.example:8080/api/v2/micro/")
    before = _rss_mb()
    padding = "h" * 8000
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"{otad.url}/api/v2/otaPassiveEnable?deviceName=dev1"

        async def poll(start: int) -> None:
            for i in range(start, 20_000, 32):
                async with http.get(url, headers={"Host": f"{padding}{i}.example"}) as response:
                    assert response.status == 200
                    await response.read()

        await asyncio.gather(*(poll(start) for start in range(32)))
    assert _rss_mb() - before < 100


async def test_range_edges(otad):
    await otad.upload("fw", 1, b"0123456789")
    _, listed = await otad.request("GET", "/api/v2/otaList")
    url = f"{otad.url}/api/v2/micro/{listed['data'][0]['fileName']}"
    async with otad.session.get(url, headers={"Range": "bytes=-0"}) as response:
        assert response.status == 416 and response.headers["Content-Range"] == "bytes */10"
    async with otad.session.get(url, headers={"Range": "bytes=0-1,4-5"}) as response:
        assert response.status == 200 and await response.read() == b"0123456789"
    async with otad.session.get(url, headers={"Range": "bytes=-3"}) as response:
        assert response.status == 206 and await response.read() == b"789"


async def test_a_second_file_part_is_refused_and_nothing_is_stored(otad):
    form = aiohttp.FormData()
    form.add_field("file", b"first", filename="a.bin")
    form.add_field("file", b"second", filename="b.bin")
    status, body = await otad.request("POST", "/api/v2/otaUpload", params={"name": "fw", "productId": "1"},
                                      data=form)
    assert_error(status, body, 400, 1001)
    assert "more than one" in body["errorMsg"]
    assert otad.db_rows("package") == 0 and otad.firmware_files() == []


async def test_request_ids_are_echoed_only_when_short_and_plain(otad):
    for sent, echoed in (("abc-123", True), ("x" * 65, False), ("bad id!", False), ("日本", False)):
        async with otad.session.get(f"{otad.url}/healthz", headers={"X-Request-Id": sent}) as response:
            got = response.headers["X-Request-Id"]
            assert (got == sent) is echoed and len(got) <= 64 and got.isascii()


async def test_an_aborted_upload_is_not_an_error(otad, caplog):
    head = (b"POST /api/v2/otaUpload?name=fw&productId=1 HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: " + otad.token.encode() + b"\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 10000000\r\n\r\n"
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n')
    with caplog.at_level(logging.INFO):
        _, writer = await asyncio.open_connection("127.0.0.1", otad.daemon.http_port)
        writer.write(head + b"x" * 100_000)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.transport.abort()
        for _ in range(50):
            if any("closed the connection" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
    assert any("closed the connection" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert otad.db_rows("package") == 0 and otad.firmware_files() == []
    assert await _healthz(otad.url) == 200


async def test_a_stalled_upload_body_is_refused(tmp_path):
    otad = await start_otad(make_settings(tmp_path / "data", **{"http.body_timeout": 0.5}))
    try:
        async def body():
            yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\nsome'
            await asyncio.sleep(3)
            yield b"more\r\n--B--\r\n"

        status, reply = await otad.request("POST", "/api/v2/otaUpload", params={"name": "fw", "productId": "1"},
                                           data=body(), headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert_error(status, reply, 400, 1001)
        assert "sent nothing" in reply["errorMsg"]
        assert otad.db_rows("package") == 0 and otad.firmware_files() == []
    finally:
        await otad.stop()


async def test_shutdown_during_a_download_takes_one_shutdown_timeout(tmp_path):
    http_port, mqtt_port = free_port(), free_port()
    command = [sys.executable, "-m", "otad", "serve", "--data-dir", str(tmp_path), "--http-host", "127.0.0.1",
               "--http-port", str(http_port), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port),
               "--shutdown-timeout", "2"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        await wait_for_port(http_port, process)
        token = subprocess.run([sys.executable, "-m", "otad", "token", "create", "t", "--data-dir", str(tmp_path)],
                               capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
        base = f"http://127.0.0.1:{http_port}"
        async with aiohttp.ClientSession(headers={"Authorization": token}) as http:
            form = aiohttp.FormData()
            form.add_field("file", os.urandom(64 * 1024 * 1024), filename="big.bin")
            async with http.post(f"{base}/api/v2/otaUpload?name=big&productId=1", data=form) as response:
                file_name = (await response.json())["data"]["fileName"]
        # A slow reader: the download stays in flight across the SIGTERM.
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        writer.write(f"GET /api/v2/micro/{file_name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await reader.read(1024)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
        took = time.monotonic() - started
        writer.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    assert process.returncode == 0
    assert took < 2 * 2  # one shutdown_timeout (2 s) and change, not two
