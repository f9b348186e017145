"""mqtt.mode = external against a real mosquitto 2 with its dynamic-security plugin (tests/mosquitto.py):
otad opens no MQTT listener, provisions device accounts (mqtt.provisioning = mosquitto-dynsec),
publishes retained commands, applies the reports it gets through its shared subscription, and
loses nothing when the broker or otad restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys

import aiohttp
import pytest

from otad.daemon import Daemon
from otad.errors import StartupError
from tests.conftest import Otad, eventually, make_settings, running_otad
from tests.mosquitto import mosquitto  # noqa: F401 (the fixture)
from tests.mqtt_device import MqttDevice

COMMAND = "/oc/devices/{}/sys/ota"
REPORT = "/oc/devices/{}/sys/ota/report"
REPLY = "/oc/devices/{}/sys/ota/report_reply"


def external(tmp_path, broker, **flags):
    return make_settings(tmp_path / "data", **{"mqtt.mode": "external", "mqtt.external_url": broker.url,
                                               "mqtt.provisioning": "mosquitto-dynsec", **flags})


async def _device(broker, name: str, password: str, **kwargs) -> MqttDevice:
    device = MqttDevice(broker.port, name, password, **kwargs)
    assert await device.connect() == 0
    return device


async def _upgrade(otad, version: str) -> dict:
    status, body = await otad.request("GET", f"/api/v2/upgrades/{version}")
    assert status == 200, body
    return body["data"]


async def _enable(otad, name: str) -> str:
    status, body = await otad.request("POST", "/api/v2/otaEnable", params={"name": "fw", "deviceName": name})
    assert status == 200, body
    return body["data"][0]["version"]


async def _enabled(otad) -> tuple[str, str]:
    """dev1 registered, a package enabled for it and its command acknowledged by the broker:
    (dev1's password, the upgrade's version)."""
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"image")
    version = await _enable(otad, "dev1")
    assert await otad.daemon._broker.wait_sent(5)
    return password, version


async def _retained_command(broker, name: str, password: str) -> bytes | None:
    """What a device that subscribes now gets from the broker's retained store (None: nothing)."""
    device = await _device(broker, name, password, client_id=f"{name}-probe")
    try:
        assert await device.subscribe(COMMAND.format(name)) == [1]
        try:
            message = await device.next_message(timeout=1.0)
        except Exception:
            return None
        assert message.retain
        return message.payload
    finally:
        await device.close()


async def test_devices_get_broker_accounts_that_reach_only_their_own_topics(tmp_path, mosquitto):
    async with running_otad(external(tmp_path, mosquitto)) as otad:
        assert otad.daemon.mqtt_port is None
        # No MQTT listener of otad's own: the configured embedded port is not listened on.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", otad.settings.mqtt.port), timeout=0.5).close()
        password = await otad.add_device("dev1", 1)
        other = await otad.add_device("dev2", 1)
        assert await MqttDevice(mosquitto.port, "dev1", "not-its-password").connect() == 5
        assert await MqttDevice(mosquitto.port, "nobody", password).connect() == 5

        snoop = await _device(mosquitto, "dev1", password)
        assert await snoop.subscribe(COMMAND.format("dev1")) == [1]
        assert await snoop.subscribe(COMMAND.format("dev2")) == [0x80]
        assert await snoop.subscribe("/oc/devices/+/sys/ota/report") == [0x80]
        assert await snoop.subscribe("#") == [0x80]
        victim = await _device(mosquitto, "dev2", other)
        assert await victim.subscribe(COMMAND.format("dev2")) == [1]
        await victim.publish(REPORT.format("dev2"), b'{"version":"x","status":"downloading"}')
        await otad.upload("fw", 1, b"image")
        await _enable(otad, "dev2")
        assert (await victim.next_message()).topic == COMMAND.format("dev2")
        assert await snoop.no_message(within=0.5)  # nothing of dev2's reached dev1

        # A device may not forge its own command (only otad publishes there): mosquitto drops it.
        await asyncio.to_thread(snoop.client.publish(COMMAND.format("dev1"), b"forged", 1, retain=True)
                                .wait_for_publish, 5)
        assert await snoop.no_message(within=0.5)
        await snoop.close()
        assert await _retained_command(mosquitto, "dev1", password) is None
        await victim.close()

        status, _ = await otad.request("DELETE", "/api/v2/devices", params={"deviceName": "dev2"})
        assert status == 200
        assert await MqttDevice(mosquitto.port, "dev2", other).connect() == 5


async def test_upgrade_through_mosquitto_ends_updated_and_clears_the_retained_command(tmp_path, mosquitto):
    async with running_otad(external(tmp_path, mosquitto)) as otad:
        password, version = await _enabled(otad)

        # The device subscribes after the enable: the broker's retained copy reaches it.
        device = await _device(mosquitto, "dev1", password)
        assert await device.subscribe(REPLY.format("dev1")) == [1]
        assert await device.subscribe(COMMAND.format("dev1")) == [1]
        message = await device.next_message()
        assert message.topic == COMMAND.format("dev1") and message.retain and message.qos == 1
        assert json.loads(message.payload)["version"] == version

        commands = []
        for status in ("downloading", "downloaded", "verified", "updating", "updated"):
            await device.publish(REPORT.format("dev1"), json.dumps({"version": version, "status": status}).encode())
            while (reply := await device.next_message()).topic == COMMAND.format("dev1"):
                commands.append(reply.payload)
            assert reply.topic == REPLY.format("dev1")
            assert json.loads(reply.payload) == {"version": version, "accepted": True, "errorMsg": ""}
        upgrade = await _upgrade(otad, version)
        assert upgrade["state"] == "updated" and upgrade["finishedAt"]
        assert await otad.daemon._broker.wait_sent(5)
        # The clear is an empty retained message: the broker passes it to subscribers too.
        while len(commands) < 1:
            commands.append((await device.next_message()).payload)
        assert commands == [b""]
        await device.close()
        assert await _retained_command(mosquitto, "dev1", password) is None


async def test_a_command_sent_while_the_broker_is_down_arrives_after_it_returns(tmp_path, mosquitto):
    async with running_otad(external(tmp_path, mosquitto)) as otad:
        password = await otad.add_device("dev1", 1)
        await otad.upload("fw", 1, b"image")
        broker = otad.daemon._broker
        mosquitto.stop()
        await eventually(lambda: not broker.connected.is_set())
        version = await _enable(otad, "dev1")  # the API answers; the command waits
        assert broker.pending_commands == 1
        mosquitto.start()
        await asyncio.wait_for(broker.connected.wait(), 10)
        assert await broker.wait_sent(5)
        assert json.loads(await _retained_command(mosquitto, "dev1", password))["version"] == version


async def test_a_report_sent_while_otad_is_away_is_applied_after_a_broker_restart(tmp_path, mosquitto):
    settings = external(tmp_path, mosquitto)
    async with running_otad(settings) as otad:
        password, version = await _enabled(otad)
        client_id = otad.daemon._broker.client_id
        token = otad.token

    # otad is stopped: its persistent session on mosquitto holds what devices send meanwhile.
    device = await _device(mosquitto, "dev1", password)
    await device.publish(REPORT.format("dev1"), json.dumps({"version": version, "status": "updated"}).encode())
    await device.close()
    mosquitto.restart()  # SIGTERM by PID and start again on the same persistence directory

    async with _again(settings, token) as otad:
        assert otad.daemon._broker.client_id == client_id  # the same session, kept in the data dir
        await eventually(lambda: otad.daemon.services.ingest.applied >= 1, timeout=10)
        assert (await _upgrade(otad, version))["state"] == "updated"
        assert await otad.daemon._broker.wait_sent(5)
        assert await _retained_command(mosquitto, "dev1", password) is None


async def test_a_report_in_flight_across_a_broker_restart_is_not_lost(tmp_path, mosquitto):
    async with running_otad(external(tmp_path, mosquitto)) as otad:
        password, version = await _enabled(otad)
        broker = otad.daemon._broker
        device = await _device(mosquitto, "dev1", password, client_id="dev1-persistent", clean_session=False)
        await device.publish(REPORT.format("dev1"), json.dumps({"version": version, "status": "updated"}).encode())
        mosquitto.restart()  # right after the report: otad may or may not have had it
        await asyncio.wait_for(broker.connected.wait(), 15)
        await eventually(lambda: otad.daemon.services.ingest.applied >= 1, timeout=10)
        assert (await _upgrade(otad, version))["state"] == "updated"
        await device.close()


@contextlib.asynccontextmanager
async def _again(settings, token: str):
    """A new daemon on the same data dir, driven with the first one's API token."""
    daemon = Daemon(settings)
    await daemon.start()
    otad = Otad(daemon=daemon, token=token, session=aiohttp.ClientSession())
    try:
        yield otad
    finally:
        await otad.stop()


def _otad_cli(settings, broker, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OTAD_MQTT_MODE": "external", "OTAD_MQTT_EXTERNAL_URL": broker.url,
           "OTAD_MQTT_PROVISIONING": "mosquitto-dynsec"}
    return subprocess.run([sys.executable, "-m", "otad", *args, "--data-dir", str(settings.data_dir)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, env=env)


async def test_reset_password_refuses_the_old_password_on_mosquitto(tmp_path, mosquitto):
    settings = external(tmp_path, mosquitto)
    async with running_otad(settings) as otad:
        old = await otad.add_device("dev1", 1)
        await otad.add_device("dev2", 1)
    # The admin command pushes the accounts itself, with or without a daemon running.
    added = await asyncio.to_thread(_otad_cli, settings, mosquitto, "device", "add", "dev3", "--product-id", "1")
    assert added.returncode == 0, added.stderr
    assert await MqttDevice(mosquitto.port, "dev3", added.stdout.strip()).connect() == 0

    reset = await asyncio.to_thread(_otad_cli, settings, mosquitto, "device", "reset-password", "dev1")
    assert reset.returncode == 0, reset.stderr
    [(name, new)] = [line.split("\t") for line in reset.stdout.splitlines()]
    assert name == "dev1" and new != old
    assert await MqttDevice(mosquitto.port, "dev1", old).connect() == 5
    assert await MqttDevice(mosquitto.port, "dev1", new).connect() == 0

    every = await asyncio.to_thread(_otad_cli, settings, mosquitto, "device", "reset-password", "--all")
    assert every.returncode == 0, every.stderr
    passwords = dict(line.split("\t") for line in every.stdout.splitlines())
    assert sorted(passwords) == ["dev1", "dev2", "dev3"]
    assert await MqttDevice(mosquitto.port, "dev1", new).connect() == 5
    for name, password in passwords.items():
        assert await MqttDevice(mosquitto.port, name, password).connect() == 0

    wrong = await asyncio.to_thread(_otad_cli, settings, mosquitto, "device", "reset-password")
    assert wrong.returncode == 2 and "NAME or --all" in wrong.stderr
    daemon = Daemon(settings)  # otad's registry has the new ones too
    await daemon.start()
    try:
        assert await daemon.services.devices.check_mqtt_login("dev2", passwords["dev2"])
        assert not await daemon.services.devices.check_mqtt_login("dev2", old)
    finally:
        await daemon.stop()


async def test_a_refused_account_is_a_clear_startup_error(tmp_path, mosquitto):
    url = mosquitto.url.replace(mosquitto.otad_password, "wrong")
    daemon = Daemon(external(tmp_path, mosquitto, **{"mqtt.external_url": url}))
    with pytest.raises(StartupError, match="bad user name or password|not authorized") as refused:
        await daemon.start()
    assert "wrong" not in str(refused.value)  # the URL's password is never shown


async def test_provisioning_failure_leaves_no_device_behind(tmp_path, mosquitto):
    async with running_otad(external(tmp_path, mosquitto)) as otad:
        mosquitto.stop()
        status, body = await otad.request("POST", "/api/v2/devices", json={"deviceName": "dev1", "productId": 1})
        assert status == 502 and "cannot reach the MQTT broker" in body["errorMsg"]
        assert otad.db_rows("device") == 0


async def test_reset_password_holds_at_once_on_a_running_embedded_broker(tmp_path):
    # Embedded mode: otad checks passwords itself, from a cache the admin command cannot see: the old
    # password stops within a maintenance round (the marker file), the new one works.
    async with running_otad(make_settings(tmp_path / "data")) as otad:
        old = await otad.add_device("dev1", 1)
        assert await otad.device("dev1", old).connect() == 0
        reset = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "otad", "device", "reset-password",
                                                         "dev1", "--data-dir", str(otad.settings.data_dir)],
                                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert reset.returncode == 0, reset.stderr
        new = reset.stdout.strip().split("\t")[1]
        deadline = asyncio.get_running_loop().time() + 15
        while (await (attempt := otad.device("dev1", old, client_id="dev1-old")).connect()) == 0:
            await attempt.close()
            assert asyncio.get_running_loop().time() < deadline, "the old password still works"
            await asyncio.sleep(0.5)
        device = otad.device("dev1", new, client_id="dev1-new")
        assert await device.connect() == 0
        await device.close()


async def test_a_broker_that_lost_its_state_gets_the_open_commands_again(tmp_path, mosquitto):
    async with running_otad(external(tmp_path, mosquitto)) as otad:
        password, version = await _enabled(otad)
        broker = otad.daemon._broker
        # A broker that crashed before saving (or lost its disk): no session, no retained command.
        mosquitto.stop()
        for saved in (mosquitto.root / "persistence").iterdir():
            saved.unlink()
        mosquitto.start()
        await asyncio.wait_for(broker.connected.wait(), 15)
        device = await _device(mosquitto, "dev1", password)
        assert await device.subscribe(COMMAND.format("dev1")) == [1]
        # Retained, or live if otad republishes after the subscribe: the device gets it either way.
        assert json.loads((await device.next_message(timeout=10)).payload)["version"] == version
        await device.close()
        assert await broker.wait_sent(5)
        assert json.loads(await _retained_command(mosquitto, "dev1", password))["version"] == version
