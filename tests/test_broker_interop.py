"""The embedded broker with an MQTT client implementation that is not ours: amqtt's MQTTClient
(used through its public API only). Its QoS 1 and 2 flows, retained messages and persistent
sessions against otad's broker core."""

from __future__ import annotations

import pytest
from amqtt.client import MQTTClient



def _client(client_id: str) -> MQTTClient:
    return MQTTClient(client_id=client_id, config={"auto_reconnect": False})


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_amqtt_client_publishes_and_receives_at_each_qos(lab, qos):
    url = f"mqtt://127.0.0.1:{lab.mqtt_port}/"
    subscriber, publisher = _client("amqtt-sub"), _client("amqtt-pub")
    await subscriber.connect(url)
    await publisher.connect(url)
    try:
        assert await subscriber.subscribe([("interop/#", qos)]) == [qos]
        await publisher.publish("interop/t", b"hello", qos=qos)
        message = await subscriber.deliver_message(timeout_duration=5)
        assert message is not None
        assert (message.topic, bytes(message.data), message.qos) == ("interop/t", b"hello", qos)
    finally:
        await publisher.disconnect()
        await subscriber.disconnect()


async def test_amqtt_client_gets_the_retained_message_and_its_persistent_queue(lab):
    url = f"mqtt://127.0.0.1:{lab.mqtt_port}/"
    publisher = _client("amqtt-pub")
    await publisher.connect(url)
    await publisher.publish("interop/retained", b"kept", qos=1, retain=True)
    subscriber = _client("amqtt-persistent")
    await subscriber.connect(url, cleansession=False)
    assert await subscriber.subscribe([("interop/+", 1)]) == [1]
    message = await subscriber.deliver_message(timeout_duration=5)
    assert (bytes(message.data), bool(message.publish_packet.retain_flag)) == (b"kept", True)
    await subscriber.disconnect()

    await publisher.publish("interop/queued", b"while away", qos=1)
    subscriber = _client("amqtt-persistent")
    await subscriber.connect(url, cleansession=False)
    try:
        message = await subscriber.deliver_message(timeout_duration=5)
        assert (message.topic, bytes(message.data)) == ("interop/queued", b"while away")
    finally:
        await subscriber.disconnect()
        await publisher.disconnect()
