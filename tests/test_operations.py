"""Running it for real: health, metrics, request ids, the systemd watchdog."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

from tests.conftest import free_port


async def test_healthz_reports_broker_and_database(otad):
    async with otad.session.get(f"{otad.url}/healthz") as response:  # no token needed
        assert response.status == 200
        assert await response.json() == {"status": "ok", "broker": True, "database": True, "firmware": True}


async def test_metrics_need_a_token_and_count_what_happened(otad):
    async with otad.session.get(f"{otad.url}/metrics") as response:
        assert response.status == 401
    password = await otad.add_device("dev1", 1)
    device = otad.device("dev1", password)
    assert await device.connect() == 0
    await device.subscribe("/oc/devices/dev1/sys/ota")
    _, body = await otad.upload("fw", 1, b"x" * 1000)
    await otad.enable("fw", "dev1")
    await device.next_message()
    async with otad.session.get(f"{otad.url}/api/v2/micro/{body['data']['fileName']}") as response:
        await response.read()
    assert await otad.device("dev1", "wrong").connect() == 5
    async with otad.session.get(f"{otad.url}/metrics", headers=otad.auth) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    lines = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert lines["otad_mqtt_connected_clients"] == 1
    assert lines['otad_upgrades{state="notified"}'] == 1
    assert lines["otad_firmware_bytes_served_total"] == 1000
    assert lines['otad_mqtt_connections_refused_total{reason="not_authorized"}'] == 1
    assert lines["otad_mqtt_messages_sent_total"] >= 1
    assert any(key.startswith('otad_http_request_duration_seconds_count{method="POST",route="/api/v2/otaEnable"')
               for key in lines)
    await device.close()


async def test_every_reply_carries_a_request_id(otad):
    async with otad.session.get(f"{otad.url}/api/v2/otaList", headers={"X-Request-Id": "abc123"}) as response:
        assert response.headers["X-Request-Id"] == "abc123"
    async with otad.session.get(f"{otad.url}/nowhere") as response:
        assert len(response.headers["X-Request-Id"]) == 16


async def test_systemd_watchdog_is_pinged_while_healthy(tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify_path)
    receiver.settimeout(20)
    process = subprocess.Popen(
        [sys.executable, "-m", "otad", "serve", "--data-dir", str(tmp_path / "d"), "--http-host", "127.0.0.1",
         "--http-port", str(free_port()), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(free_port())],
        env={**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        messages = []
        while messages.count("WATCHDOG=1") < 3:
            messages.append((await asyncio.to_thread(receiver.recv, 4096)).decode())
        assert messages[0] == "READY=1"
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
        receiver.close()


async def test_download_latency_is_recorded_with_its_real_status(otad):
    _, body = await otad.upload("fw", 1, b"z" * 5000)
    async with otad.session.get(f"{otad.url}/api/v2/micro/{body['data']['fileName']}",
                                headers={"Range": "bytes=0-99"}) as response:
        assert response.status == 206
        await response.read()
    async with otad.session.get(f"{otad.url}/metrics", headers=otad.auth) as response:
        text = await response.text()
    assert 'otad_http_request_duration_seconds_count{method="GET",route="/api/v2/micro/{fileName}",status="206"} 1.0' \
        in text
