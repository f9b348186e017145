"""Commands in flight when a device drops: never a cancelled one, never twice, in order.

Found in review; each failed before the fix in otad/mqtt/broker.py and handler.py."""

from __future__ import annotations

import asyncio
import json

from tests.rawmqtt import RawClient

CMD = "/oc/devices/dev1/sys/ota"

async def test_cancel_while_connected_then_drop_redelivers(otad):
    """Cancel while the command is in flight (connected, not yet PUBACKed); the device then drops and
    reconnects with CleanSession 0: the cancelled command comes back with DUP."""
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"fw")
    holder = RawClient(otad.mqtt_port, auto_ack=False)
    assert (await holder.connect("dev1", "dev1", password, clean=False))[1] == 0
    await holder.subscribe((CMD, 1))
    _, body = await otad.enable("fw", "dev1")
    version = body["data"][0]["version"]
    first = await holder.message()
    assert json.loads(first.payload)["version"] == version
    status, _ = await otad.request("POST", f"/api/v2/upgrades/{version}/cancel")
    assert status == 200
    await holder.close()
    await asyncio.sleep(0.3)
    again = RawClient(otad.mqtt_port, auto_ack=False)
    assert (await again.connect("dev1", "dev1", password, clean=False))[1] == 0
    try:
        msg = await again.message(timeout=1.5)
        redelivered = json.loads(msg.payload).get("version") == version
    except (asyncio.TimeoutError, TimeoutError):
        redelivered = False
    await again.close()
    assert not redelivered, "cancelled command re-sent from inflight_out"

async def test_dup_redelivery_then_resubscribe_duplicates(otad):
    """Unacked command in flight; reconnect (CleanSession 0) gets the DUP re-send, and the usual
    re-SUBSCRIBE then delivers the retained copy of the same command again."""
    password = await otad.add_device("dev1", 1)
    await otad.upload("fw", 1, b"fw")
    holder = RawClient(otad.mqtt_port, auto_ack=False)
    assert (await holder.connect("dev1", "dev1", password, clean=False))[1] == 0
    await holder.subscribe((CMD, 1))
    _, body = await otad.enable("fw", "dev1")
    await holder.message()
    await holder.close()
    await asyncio.sleep(0.3)
    again = RawClient(otad.mqtt_port)
    assert (await again.connect("dev1", "dev1", password, clean=False))[1] == 0
    got = [await again.message(timeout=2)]
    await again.subscribe((CMD, 1))
    try:
        while True:
            got.append(await again.message(timeout=1))
    except (asyncio.TimeoutError, TimeoutError):
        pass
    await again.close()
    assert len(got) == 1, "same command delivered twice on one connection"

async def test_order_of_redelivery_vs_queued(otad):
    """[MQTT-4.6.0-2/-6]: an unacknowledged message (sent first) must not be overtaken by one queued
    while offline. Same topic, QoS 1. (Report replies went to QoS 0 in bce94a9, so another of the
    device's own topics carries the messages.)"""
    password = await otad.add_device("dev1", 1)
    topic = "/oc/devices/dev1/sys/properties/report"
    holder = RawClient(otad.mqtt_port, auto_ack=False)
    assert (await holder.connect("dev1", "dev1", password, clean=False))[1] == 0
    await holder.subscribe((topic, 1))
    other = RawClient(otad.mqtt_port)
    assert (await other.connect("dev1-o", "dev1", password))[1] == 0
    await other.publish(topic, b'{"version":"first"}', qos=1)
    first = await holder.message()  # received, never acknowledged
    await holder.close()
    await asyncio.sleep(0.3)
    await other.publish(topic, b'{"version":"second"}', qos=1)
    await asyncio.sleep(0.3)
    again = RawClient(otad.mqtt_port)
    assert (await again.connect("dev1", "dev1", password, clean=False))[1] == 0
    got = []
    try:
        while True:
            got.append(await again.message(timeout=1))
    except (asyncio.TimeoutError, TimeoutError):
        pass
    await again.close(); await other.close()
    assert got and got[0].dup, "queued (newer) message overtook the DUP re-send of the older one"
    assert got[0].payload == first.payload and len(got) == 2 and not got[1].dup
