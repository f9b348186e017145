"""MQTT security: devices authenticate and use only /oc/devices/{own name}/#."""

from __future__ import annotations

import asyncio

from tests.conftest import make_settings, start_otad
from tests.mqtt_device import MqttDevice
from tests.rawmqtt import RawClient

REFUSED = 0x80
NOT_AUTHORIZED = 5


async def test_device_may_subscribe_below_its_own_root(otad):
    device = otad.device("dev1", await otad.add_device("dev1", 1))
    assert await device.connect() == 0
    assert await device.subscribe("/oc/devices/dev1/sys/ota") == [1]
    assert await device.subscribe("/oc/devices/dev1/#") == [1]
    assert await device.subscribe("/oc/devices/dev1/+/ota", qos=0) == [0]
    await device.close()


async def test_subscribing_outside_own_topics_is_refused(otad):
    await otad.add_device("dev2", 1)
    device = otad.device("dev1", await otad.add_device("dev1", 1))
    assert await device.connect() == 0
    for topic in ("/oc/devices/dev2/sys/ota", "/oc/devices/dev2/#", "/oc/#", "#", "/oc/devices/+/sys/ota",
                  "+/devices/dev1/sys/ota", "/oc/devices/dev1x/sys/ota", "$SYS/#"):
        assert await device.subscribe(topic) == [REFUSED], topic
    await device.close()


async def test_publish_to_another_devices_topic_is_dropped(otad):
    dev1 = otad.device("dev1", await otad.add_device("dev1", 1))
    dev2 = otad.device("dev2", await otad.add_device("dev2", 1))
    assert await dev1.connect() == 0 and await dev2.connect() == 0
    assert await dev2.subscribe("/oc/devices/dev2/#") == [1]
    await dev1.publish("/oc/devices/dev2/sys/ota", b'{"fileName":"evil.bin"}')
    await dev2.publish("/oc/devices/dev2/sys/properties/report", b"own")
    message = await dev2.next_message()
    assert message.payload == b"own"  # its own publish arrives, dev1's forged one never did
    assert await dev2.no_message(within=0.5)
    await dev1.close()
    await dev2.close()


async def test_wrong_password_unknown_device_and_anonymous_are_refused(otad):
    await otad.add_device("dev1", 1)
    assert await otad.device("dev1", "wrong-password").connect() == NOT_AUTHORIZED
    assert await otad.device("nobody", "whatever").connect() == NOT_AUTHORIZED
    assert await MqttDevice(otad.mqtt_port, None, None, client_id="anon").connect() == NOT_AUTHORIZED
    # The daemon keeps serving the right device after refusing the others.
    assert await otad.device("dev1", "wrong").connect() == NOT_AUTHORIZED
    assert await otad.device("dev1", None).connect() == NOT_AUTHORIZED


async def test_deleted_device_is_disconnected_and_can_no_longer_log_in(otad):
    password = await otad.add_device("dev1", 1)
    connected = otad.device("dev1", password)
    assert await connected.connect() == 0
    status, _ = await otad.request("DELETE", "/api/v2/devices", params={"deviceName": "dev1"})
    assert status == 200
    assert await asyncio.to_thread(connected.disconnected.wait, 5)
    await connected.close()
    assert await otad.device("dev1", password).connect() == NOT_AUTHORIZED


async def test_a_device_cannot_take_over_another_devices_session(otad):
    password1 = await otad.add_device("dev1", 1)
    password2 = await otad.add_device("dev2", 1)
    owner = MqttDevice(otad.mqtt_port, "dev1", password1, client_id="shared-id", clean_session=False)
    assert await owner.connect() == 0
    assert await owner.subscribe("/oc/devices/dev1/sys/ota") == [1]
    await owner.close()
    await otad.upload("fw", 1, b"fw")
    await otad.enable("fw", "dev1")  # queued in dev1's offline session

    # Same client id, other device: it gets a session of its own, not dev1's (or its queue).
    thief = MqttDevice(otad.mqtt_port, "dev2", password2, client_id="shared-id", clean_session=False)
    assert await thief.connect() == 0
    assert await thief.no_message(within=0.5)
    await thief.close()
    wiper = MqttDevice(otad.mqtt_port, "dev2", password2, client_id="shared-id", clean_session=True)
    assert await wiper.connect() == 0
    await wiper.close()

    owner = MqttDevice(otad.mqtt_port, "dev1", password1, client_id="shared-id", clean_session=False)
    assert await owner.connect() == 0
    assert b'"fileName"' in (await owner.next_message()).payload  # the session and its queue survived
    await owner.close()


async def test_a_device_cannot_lock_another_out_by_squatting_its_client_id(otad):
    victim_password = await otad.add_device("victim", 1)
    squatter = MqttDevice(otad.mqtt_port, "squatter", await otad.add_device("squatter", 1), client_id="victim",
                          clean_session=False)
    assert await squatter.connect() == 0
    for clean_session in (True, False):
        victim = MqttDevice(otad.mqtt_port, "victim", victim_password, client_id="victim", clean_session=clean_session)
        assert await victim.connect() == 0
        await victim.close()
    await squatter.close()


async def test_a_will_on_another_devices_topic_is_refused(otad):
    """amqtt published wills without the topic ACL: a device could plant a forged OTA command."""
    victim_password = await otad.add_device("victim", 1)
    attacker_password = await otad.add_device("attacker", 1)
    attacker = RawClient(otad.mqtt_port)
    _, code = await attacker.connect("attacker", "attacker", attacker_password,
                                     will=("/oc/devices/victim/sys/ota", b'{"fileName":"EVIL.bin"}', 1, True))
    assert code == NOT_AUTHORIZED
    await attacker.close()
    own = RawClient(otad.mqtt_port)
    _, code = await own.connect("attacker", "attacker", attacker_password,
                                will=("/oc/devices/attacker/status", b"offline", 1, False))
    assert code == 0
    await own.close()
    victim = otad.device("victim", victim_password)
    assert await victim.connect() == 0
    assert await victim.subscribe("/oc/devices/victim/sys/ota") == [1]
    assert await victim.no_message(within=0.5)
    await victim.close()


async def test_anonymous_clients_are_accepted_only_in_lab_mode(tmp_path):
    lab = await start_otad(make_settings(tmp_path / "lab", **{"mqtt.allow_anonymous": True}))
    try:
        anonymous = MqttDevice(lab.mqtt_port, None, None, client_id="anon")
        assert await anonymous.connect() == 0
        assert await anonymous.subscribe("/oc/devices/dev1/sys/ota") == [1]
        await anonymous.close()
        # Credentials, when given, are still checked in lab mode.
        await lab.add_device("dev1", 1)
        assert await lab.device("dev1", "wrong").connect() == NOT_AUTHORIZED
    finally:
        await lab.stop()


async def test_a_device_cannot_publish_on_its_own_command_or_reply_topic(otad):
    """Otherwise it could erase (empty retained publish) or forge its own pending command."""
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"fw")
    await otad.enable("fw", "dev1")
    device = RawClient(otad.mqtt_port)
    assert (await device.connect("dev1-a", "dev1", password))[1] == 0
    await device.publish("/oc/devices/dev1/sys/ota", b"", qos=1, retain=True)
    await device.publish("/oc/devices/dev1/sys/ota/report_reply", b"{}", qos=1)
    await device.close()
    willing = RawClient(otad.mqtt_port)
    _, code = await willing.connect("dev1-b", "dev1", password, will=("/oc/devices/dev1/sys/ota", b"", 1, True))
    assert code == NOT_AUTHORIZED
    await willing.close()
    listener = otad.device("dev1", password, client_id="dev1-c")
    assert await listener.connect() == 0
    await listener.subscribe("/oc/devices/dev1/sys/ota")
    assert b'"fileName"' in (await listener.next_message()).payload  # the command is still there
    await listener.close()
