"""Offline devices lose nothing: the latest enabled command waits for them, across restarts too,
and never reaches another device."""

from __future__ import annotations

import json

from tests.mqtt_device import MqttDevice

TOPIC = "/oc/devices/{}/sys/ota"


async def _enable(otad, name: str, device: str) -> str:
    status, body = await otad.enable(name, device)
    assert status == 200, body
    return body["data"][0]["version"]


async def test_offline_device_gets_upgrade_when_it_subscribes_with_clean_session(otad):
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"firmware-1")
    version = await _enable(otad, "fw", "dev1")

    device = otad.device("dev1", password)
    assert await device.connect() == 0
    assert await device.subscribe(TOPIC.format("dev1")) == [1]
    message = await device.next_message()
    assert json.loads(message.payload)["version"] == version
    await device.close()


async def test_offline_persistent_session_gets_upgrade_on_reconnect_without_resubscribing(otad):
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"firmware-1")
    device = MqttDevice(otad.mqtt_port, "dev1", password, client_id="dev1", clean_session=False)
    assert await device.connect() == 0
    assert await device.subscribe(TOPIC.format("dev1")) == [1]
    await device.close()

    version = await _enable(otad, "fw", "dev1")

    device = MqttDevice(otad.mqtt_port, "dev1", password, client_id="dev1", clean_session=False)
    assert await device.connect() == 0  # no SUBSCRIBE this time: the session remembers it
    message = await device.next_message()
    assert json.loads(message.payload)["version"] == version
    assert await device.no_message(within=0.5)  # once, not once per mechanism
    await device.close()


async def test_newer_enable_supersedes_the_older_for_an_offline_device(otad):
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw-a", 1, b"firmware-a")
    await otad.upload("fw-b", 1, b"firmware-b")
    device = MqttDevice(otad.mqtt_port, "dev1", password, client_id="dev1", clean_session=False)
    assert await device.connect() == 0
    assert await device.subscribe(TOPIC.format("dev1")) == [1]
    await device.close()

    await _enable(otad, "fw-a", "dev1")
    newest = await _enable(otad, "fw-b", "dev1")

    device = MqttDevice(otad.mqtt_port, "dev1", password, client_id="dev1", clean_session=False)
    assert await device.connect() == 0
    message = await device.next_message()
    assert json.loads(message.payload)["version"] == newest
    assert await device.no_message(within=0.5)
    await device.close()

    fresh = otad.device("dev1", password, client_id="dev1-clean")
    assert await fresh.connect() == 0
    await fresh.subscribe(TOPIC.format("dev1"))
    assert json.loads((await fresh.next_message()).payload)["version"] == newest
    assert await fresh.no_message(within=0.5)
    await fresh.close()


async def test_pending_upgrade_survives_daemon_restart(otad):
    password = await otad.add_device("dev1", 1)
    _, body = await otad.upload("fw", 1, b"firmware-1")
    package = body["data"]
    version = await _enable(otad, "fw", "dev1")

    await otad.restart()

    for clean_session in (True, False):
        device = MqttDevice(otad.mqtt_port, "dev1", password, client_id=f"dev1-{clean_session}",
                            clean_session=clean_session)
        assert await device.connect() == 0
        assert await device.subscribe(TOPIC.format("dev1")) == [1]
        message = await device.next_message()
        assert json.loads(message.payload) == {"fileName": package["fileName"], "version": version,
                                               "md5": package["md5"]}
        await device.close()


async def test_device_never_receives_another_devices_command(otad):
    """stack-notes: amqtt pushed retained messages matching *all* sessions' filters to each new client."""
    password1 = await otad.add_device("dev1", 1)
    password3 = await otad.add_device("dev3", 1)
    await otad.upload("fw", 1, b"firmware-1")

    dev1 = otad.device("dev1", password1)
    assert await dev1.connect() == 0
    await dev1.subscribe(TOPIC.format("dev1"))
    await _enable(otad, "fw", "dev1")
    await dev1.next_message()

    dev3 = otad.device("dev3", password3)
    assert await dev3.connect() == 0
    assert await dev3.no_message(within=1.0)  # connected, subscribed to nothing: gets nothing
    assert await dev3.subscribe(TOPIC.format("dev3")) == [1]
    assert await dev3.no_message(within=1.0)
    await dev3.close()
    await dev1.close()
