"""The embedded broker against MQTT 3.1.1 (OASIS standard; section numbers in the test names/docs).

Each test here failed against a bare amqtt 0.12.1 (stack-notes) and passes through otad/mqtt/.
A raw client is used where the behaviour under test is the client misbehaving on purpose.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.conftest import make_settings, running_otad, start_otad
from tests.rawmqtt import (CONNACK, RawClient, connect_packet, publish_packet, subscribe_packet,
                           unsubscribe_packet)


@pytest.fixture
async def lab(tmp_path):
    """A daemon in lab mode (anonymous clients, any topic) with short timeouts for the tests."""
    async with running_otad(make_settings(tmp_path / "lab", **{
            "mqtt.allow_anonymous": True, "mqtt.connect_timeout": "1", "mqtt.max_connections": "40",
            "mqtt.max_packet_size": "64KiB"})) as instance:
        yield instance


async def _client(port: int, client_id: str, **options) -> RawClient:
    client = RawClient(port, auto_ack=options.pop("auto_ack", True))
    present, code = await client.connect(client_id, **options)
    assert code == 0
    return client


async def _go_offline(client: RawClient, watcher: RawClient, will_topic: str) -> None:
    """Drop ``client`` and wait until the broker has noticed (its will arrives at ``watcher``), so
    what is published next finds the session offline, as for a device that vanished long ago."""
    await client.close()
    message = await watcher.message()
    assert message.topic == will_topic


async def test_offline_queue_for_anonymous_persistent_session_retain_cleared(lab):
    """3.1.2.4: QoS 1 and 2 messages for a disconnected persistent session are stored and sent on
    reconnect; 3.3.1.3 [MQTT-3.3.1-9]: they match an established subscription, so RETAIN is 0."""
    pub = await _client(lab.mqtt_port, "pub")
    await pub.subscribe(("gone/#", 1))
    sub = await _client(lab.mqtt_port, "offline-sub", clean=False, will=("gone/sub", b"", 1, False))
    assert await sub.subscribe(("q/t", 2)) == [2]
    await _go_offline(sub, pub, "gone/sub")
    await pub.publish("q/t", b"one", qos=1)
    await pub.publish("q/t", b"two", qos=2)
    await pub.publish("q/t", b"zero", qos=0)  # QoS 0 is not queued for offline sessions
    await pub.publish("gone/marker", b"", qos=1)  # routed in order: once it is back, so is "zero"
    assert (await pub.message()).topic == "gone/marker"

    sub = RawClient(lab.mqtt_port)
    assert await sub.connect("offline-sub", clean=False) == (True, 0)  # [MQTT-3.2.2-2] session present
    got = [await sub.message(), await sub.message()]
    assert [(m.payload, m.qos, m.retain) for m in got] == [(b"one", 1, False), (b"two", 2, False)]
    assert await sub.no_message()
    await sub.close()
    await pub.close()


async def test_offline_queue_for_authenticated_device(otad):
    password = await otad.add_device("dev1", 1)
    sub = RawClient(otad.mqtt_port)
    assert await sub.connect("dev1-listener", "dev1", password, clean=False) == (False, 0)
    assert await sub.subscribe(("/oc/devices/dev1/sys/properties/#", 1)) == [1]
    await sub.close()
    pub = RawClient(otad.mqtt_port)
    assert (await pub.connect("dev1-sender", "dev1", password))[1] == 0
    await pub.publish("/oc/devices/dev1/sys/properties/report", b"queued", qos=1)
    sub = RawClient(otad.mqtt_port)
    assert await sub.connect("dev1-listener", "dev1", password, clean=False) == (True, 0)
    message = await sub.message()
    assert (message.payload, message.retain) == (b"queued", False)
    await sub.close()
    await pub.close()


async def test_unacknowledged_qos1_is_redelivered_with_dup_on_reconnect(lab):
    """4.4 [MQTT-4.4.0-1]: on reconnect with CleanSession 0 the server re-sends unacknowledged PUBLISH
    packets, with DUP set [MQTT-3.3.1-1]."""
    sub = await _client(lab.mqtt_port, "slow-acker", clean=False, auto_ack=False, will=("gone/s", b"", 1, False))
    assert await sub.subscribe(("r/t", 1)) == [1]
    pub = await _client(lab.mqtt_port, "pub")
    await pub.subscribe(("gone/#", 1))
    await pub.publish("r/t", b"must arrive", qos=1)
    first = await sub.message()
    assert (first.payload, first.dup) == (b"must arrive", False)
    await _go_offline(sub, pub, "gone/s")  # no PUBACK was sent

    sub = RawClient(lab.mqtt_port)
    assert await sub.connect("slow-acker", clean=False) == (True, 0)
    again = await sub.message()
    assert (again.payload, again.qos, again.dup) == (b"must arrive", 1, True)
    assert await sub.no_message()
    await sub.close()
    await pub.close()


async def test_empty_retained_publish_clears_the_retained_message(lab):
    """3.3.1.3 [MQTT-3.3.1-10, -11]: a zero-byte retained PUBLISH removes the retained message."""
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("ret/t", b"kept", qos=1, retain=True)
    first = await _client(lab.mqtt_port, "first")
    await first.subscribe(("ret/#", 1))
    message = await first.message()
    assert (message.payload, message.retain) == (b"kept", True)  # [MQTT-3.3.1-8]
    await pub.publish("ret/t", b"", qos=1, retain=True)
    later = await _client(lab.mqtt_port, "later")
    await later.subscribe(("ret/t", 1))
    assert await later.no_message()
    for client in (pub, first, later):
        await client.close()


async def test_retained_message_only_for_the_subscribers_own_filter(lab):
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("a/one", b"1", qos=1, retain=True)
    await pub.publish("b/two", b"2", qos=1, retain=True)
    sub = await _client(lab.mqtt_port, "sub")
    await sub.subscribe(("a/+", 1))
    assert (await sub.message()).payload == b"1"
    assert await sub.no_message()
    await sub.close()
    await pub.close()


async def test_will_is_published_when_keepalive_expires(lab):
    """3.1.2.5 [MQTT-3.1.2-8], 3.1.2.10: no packet within 1.5 x keepalive -> the server disconnects
    the client and publishes its will."""
    watcher = await _client(lab.mqtt_port, "watcher")
    await watcher.subscribe(("wills/#", 1))
    silent = await _client(lab.mqtt_port, "silent", keepalive=1, will=("wills/silent", b"gone", 1, False))
    message = await watcher.message(timeout=5)
    assert (message.topic, message.payload) == ("wills/silent", b"gone")
    assert await silent.closed_by_server(timeout=2)
    await watcher.close()


async def test_will_is_published_when_connection_drops_without_disconnect(lab):
    watcher = await _client(lab.mqtt_port, "watcher")
    await watcher.subscribe(("wills/#", 1))
    dropper = await _client(lab.mqtt_port, "dropper", will=("wills/dropper", b"lost", 1, False))
    await dropper.close()
    assert (await watcher.message()).payload == b"lost"
    await watcher.close()


async def test_no_will_after_a_clean_disconnect(lab):
    """[MQTT-3.1.2-10]: the will is removed on DISCONNECT."""
    watcher = await _client(lab.mqtt_port, "watcher")
    await watcher.subscribe(("wills/#", 1))
    polite = await _client(lab.mqtt_port, "polite", will=("wills/polite", b"should not", 1, False))
    await polite.disconnect()
    assert await watcher.no_message(within=1.0)
    await watcher.close()


@pytest.mark.parametrize("publish_qos,granted_qos", [(0, 2), (1, 0), (2, 1), (1, 2), (2, 2)])
async def test_delivered_qos_is_the_minimum_of_publish_and_granted(lab, publish_qos, granted_qos):
    """3.8.4 [MQTT-3.8.4-6]."""
    sub = await _client(lab.mqtt_port, "sub")
    assert await sub.subscribe(("qos/t", granted_qos)) == [granted_qos]
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("qos/t", b"x", qos=publish_qos)
    assert (await sub.message()).qos == min(publish_qos, granted_qos)
    await sub.close()
    await pub.close()


async def test_resubscribing_replaces_the_granted_qos(lab):
    """3.8.4 [MQTT-3.8.4-3]: a SUBSCRIBE to an existing filter replaces that subscription."""
    sub = await _client(lab.mqtt_port, "sub")
    assert await sub.subscribe(("re/t", 0)) == [0]
    assert await sub.subscribe(("re/t", 1)) == [1]
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("re/t", b"x", qos=1)
    assert (await sub.message()).qos == 1
    assert await sub.no_message()  # one subscription, one copy
    await sub.close()
    await pub.close()


async def test_overlapping_subscriptions_deliver_one_copy_at_the_highest_qos(lab):
    """3.3.5: the server delivers respecting the maximum QoS of all matching subscriptions."""
    sub = await _client(lab.mqtt_port, "sub")
    await sub.subscribe(("ov/#", 0), ("ov/+", 1), ("ov/t", 0))
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("ov/t", b"x", qos=1)
    assert (await sub.message()).qos == 1
    assert await sub.no_message()
    await sub.close()
    await pub.close()


async def test_unsubscribe_stops_delivery(lab):
    sub = await _client(lab.mqtt_port, "sub")
    await sub.subscribe(("un/+", 1))
    sub.send(unsubscribe_packet(9, ["un/+"]))
    kind, _, body = await sub.read()
    assert kind == 11 and body == b"\x00\x09"  # UNSUBACK
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("un/x", b"x", qos=1)
    assert await sub.no_message()
    await sub.close()
    await pub.close()


async def test_a_silent_connection_is_closed_after_the_connect_timeout(lab):
    """3.1 [MQTT-3.1.0-1]-adjacent: a client that never sends CONNECT does not hold a socket."""
    idle = RawClient(lab.mqtt_port)
    await idle.open()
    assert await idle.closed_by_server(timeout=3)
    half = RawClient(lab.mqtt_port)
    await half.open()
    half.send(connect_packet("half")[:7])  # a truncated CONNECT
    assert await half.closed_by_server(timeout=3)


async def test_mqtt5_connect_gets_connack_0x01_and_is_closed(lab):
    """3.2.2.3: return code 0x01, unacceptable protocol level."""
    client = RawClient(lab.mqtt_port)
    await client.open()
    client.send(connect_packet("v5", level=5))
    kind, _, body = await client.read(timeout=3)
    assert (kind, body) == (CONNACK, b"\x00\x01")
    assert await client.closed_by_server(timeout=3)


async def test_max_connections_is_enforced(lab):
    clients = [await _client(lab.mqtt_port, f"c{i}") for i in range(40)]
    extra = RawClient(lab.mqtt_port)
    await extra.open()
    assert await extra.closed_by_server(timeout=3)
    await clients.pop().close()
    await asyncio.sleep(0.2)
    again = await _client(lab.mqtt_port, "after-one-left")
    for client in clients + [again]:
        await client.close()


async def test_oversized_packet_closes_only_that_connection(lab):
    bystander = await _client(lab.mqtt_port, "bystander")
    await bystander.subscribe(("big/#", 1))
    big = await _client(lab.mqtt_port, "big")
    big.send(publish_packet("big/t", b"x" * (70 * 1024), qos=0))
    assert await big.closed_by_server(timeout=3)
    huge = await _client(lab.mqtt_port, "huge")
    huge.send(bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]))  # announces 256 MB
    assert await huge.closed_by_server(timeout=3)
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("big/ok", b"fine", qos=1)
    assert (await bystander.message()).payload == b"fine"
    for client in (bystander, pub):
        await client.close()


def _fuzz_cases(rng: random.Random) -> list[tuple[bool, bytes]]:
    """(send a valid CONNECT first?, bytes): garbage, truncations, bad lengths, invalid UTF-8."""
    valid = [subscribe_packet(1, [("f/t", 1)]), publish_packet("f/t", b"p", 1, 2), bytes([0xC0, 0x00])]
    cases: list[tuple[bool, bytes]] = []
    for _ in range(60):
        cases.append((rng.random() < 0.5, rng.randbytes(rng.randint(1, 300))))
    for packet_bytes in valid + [connect_packet("x")]:
        for cut in range(1, len(packet_bytes)):
            cases.append((True, packet_bytes[:cut]))
    cases += [
        (True, bytes([0x30, 0x80, 0x80, 0x80, 0x80, 0x01])),          # five-byte remaining length
        (True, bytes([0x32, 0x07, 0x00, 0x03]) + b"\xff\xfe\xfd" + b"\x00\x01"),  # invalid UTF-8 topic
        (True, bytes([0x82, 0x06, 0x00, 0x01, 0x00, 0x01]) + b"\xc3"),  # SUBSCRIBE, bad UTF-8 filter
        (True, bytes([0x00, 0x00])),                                    # reserved packet type 0
        (True, bytes([0xF0, 0x00])),                                    # reserved packet type 15
        (True, connect_packet("again")),                                # a second CONNECT [MQTT-3.1.0-2]
        (False, bytes([0x10, 0xFF, 0xFF, 0xFF, 0xFF])),                 # CONNECT with bad length
    ]
    return cases


async def test_fuzzed_input_closes_only_the_offending_connection(lab):
    """Bounded fuzz: about 150 malformed inputs; every other client keeps working throughout."""
    rng = random.Random(20261126)
    bystander = await _client(lab.mqtt_port, "bystander")
    await bystander.subscribe(("f/#", 1))
    pub = await _client(lab.mqtt_port, "pub")
    for index, (connect_first, data) in enumerate(_fuzz_cases(rng)):
        fuzz = RawClient(lab.mqtt_port)
        if connect_first:
            _, code = await fuzz.connect(f"fuzz-{index}")
            assert code == 0
        else:
            await fuzz.open()
        fuzz.send(data)
        await fuzz.close()
        if index % 10 == 0:
            await pub.publish("f/alive", str(index).encode(), qos=1)
            message = await bystander.message()
            while message.topic != "f/alive":  # fuzz inputs that were valid publishes may arrive too
                message = await bystander.message()
            assert message.payload == str(index).encode()
    fresh = await _client(lab.mqtt_port, "fresh")
    assert await fresh.subscribe(("f/fresh", 1)) == [1]
    await pub.publish("f/fresh", b"ok", qos=1)
    assert (await fresh.message()).payload == b"ok"
    for client in (bystander, pub, fresh):
        await client.close()


async def test_garbage_after_connect_closes_the_connection(lab):
    client = await _client(lab.mqtt_port, "garbage")
    client.send(bytes([0x30, 0x80, 0x80, 0x80, 0x80, 0x01]) + b"junk")
    assert await client.closed_by_server(timeout=3)


async def test_session_takeover_closes_the_old_connection_and_keeps_one_subscription(lab):
    """3.1.4 [MQTT-3.1.4-2]: a second CONNECT with the same client id disconnects the first."""
    first = await _client(lab.mqtt_port, "twin", clean=False)
    assert await first.subscribe(("tw/t", 1)) == [1]
    second = RawClient(lab.mqtt_port)
    assert await second.connect("twin", clean=False) == (True, 0)
    assert await first.closed_by_server(timeout=3)
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("tw/t", b"once", qos=1)
    assert (await second.message()).payload == b"once"
    assert await second.no_message()
    await second.close()
    await pub.close()


async def test_clean_session_takeover_closes_the_old_connection_too(lab):
    first = await _client(lab.mqtt_port, "twin")
    await first.subscribe(("tw/c", 1))
    second = await _client(lab.mqtt_port, "twin")
    assert await first.closed_by_server(timeout=3)
    assert await second.subscribe(("tw/c", 1)) == [1]
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("tw/c", b"x", qos=1)
    assert (await second.message()).payload == b"x"
    assert await second.no_message()
    await second.close()
    await pub.close()


async def test_a_persistent_session_expires_after_the_session_expiry_interval(tmp_path):
    """mqtt.session_expiry_interval: a persistent session whose client never comes back is discarded."""
    lab = await start_otad(make_settings(tmp_path / "lab", **{"mqtt.allow_anonymous": True,
                                                              "mqtt.session_expiry_interval": "1"}))
    try:
        client = await _client(lab.mqtt_port, "expiring", clean=False)
        await client.subscribe(("ex/t", 1))
        await client.close()
        again = RawClient(lab.mqtt_port)
        assert await again.connect("expiring", clean=False) == (True, 0)  # still there at once
        await again.close()
        await asyncio.sleep(2.2)
        late = RawClient(lab.mqtt_port)
        assert await late.connect("expiring", clean=False) == (False, 0)
        await late.close()
    finally:
        await lab.stop()


async def test_a_fleet_fans_out_with_one_message_each(lab):
    """Many subscribers of distinct and shared topics; every one gets its message exactly once."""
    clients = [await _client(lab.mqtt_port, f"fan-{i}") for i in range(30)]
    for index, client in enumerate(clients):
        await client.subscribe((f"fan/{index}", 1), ("fan/all", 0))
    pub = await _client(lab.mqtt_port, "pub")
    await pub.publish("fan/all", b"everyone", qos=1)
    for index in range(30):
        await pub.publish(f"fan/{index}", str(index).encode(), qos=1)
    for index, client in enumerate(clients):
        first, second = await client.message(), await client.message()
        assert (first.payload, first.qos) == (b"everyone", 0)
        assert (second.payload, second.qos) == (str(index).encode(), 1)
        assert await client.no_message(within=0.05)
    for client in clients + [pub]:
        await client.close()


async def test_an_empty_client_id_needs_a_clean_session(lab):
    """[MQTT-3.1.3-7] an empty client id is given one for a clean session; [MQTT-3.1.3-8] with
    CleanSession 0 it is refused with CONNACK 0x02 (identifier rejected), no session made."""
    client = RawClient(lab.mqtt_port)
    assert await client.connect("", clean=False) == (False, 0x02)
    assert await client.closed_by_server()
    clean = RawClient(lab.mqtt_port)
    assert await clean.connect("", clean=True) == (False, 0)
    await clean.disconnect()
