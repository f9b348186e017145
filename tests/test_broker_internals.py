"""The broker core's pieces on their own: the packet codec, the shared deadline sweep, the per-turn
handshake gate, session bookkeeping, and the wire behaviours they add up to."""

from __future__ import annotations

import asyncio

import pytest

from otad.mqtt import protocol
from otad.mqtt.access import Verdict
from otad.mqtt.admission import TurnGate
from otad.mqtt.connection import MqttConnection
from otad.mqtt.protocol import MalformedPacket, UnsupportedProtocol
from otad.mqtt.sessions import Outgoing, Session
from otad.mqtt.sweep import DeadlineWheel
from tests.rawmqtt import (PUBCOMP, PUBREC, PUBREL, RawClient, ack_packet, connect_packet, parse_publish,
                           publish_packet, subscribe_packet)


# --- the codec ---

def test_split_packet_waits_for_whole_packets_and_bounds_their_size():
    packet = publish_packet("a/b", b"payload", qos=1, packet_id=7)
    for cut in range(len(packet)):
        assert protocol.split_packet(packet[:cut] or b"\x30", 0, 1024) is None
    first, start, end = protocol.split_packet(packet + b"\xc0", 0, 1024)
    assert first == packet[0] and end == len(packet)
    assert protocol.decode_publish(first, packet, start, end) == ("a/b", 1, 7, False, b"payload")
    with pytest.raises(MalformedPacket):
        protocol.split_packet(packet, 0, 8)  # over the size limit, known from the header alone
    with pytest.raises(MalformedPacket):
        protocol.split_packet(bytes([0x30, 0x80, 0x80, 0x80, 0x80, 0x01]), 0, 1 << 30)


def test_connect_is_decoded_and_other_protocol_levels_are_told_apart():
    packet = connect_packet("id", "user", "pw", clean=False, keepalive=30, will=("w/t", b"bye", 1, True))
    _, start, end = protocol.split_packet(packet, 0, 1024)
    connect = protocol.decode_connect(packet, start, end)
    assert (connect.client_id, connect.clean_session, connect.keepalive, connect.username, connect.password) == \
        ("id", False, 30, "user", b"pw")
    assert connect.will == protocol.Will("w/t", b"bye", 1, True)
    v5 = connect_packet("id", level=5)
    _, start, end = protocol.split_packet(v5, 0, 1024)
    with pytest.raises(UnsupportedProtocol):
        protocol.decode_connect(v5, start, end)


@pytest.mark.parametrize("body", [
    b"\x00\x03\xff\xfe\xfd\x00\x01",    # invalid UTF-8 topic
    b"\x00\x03a\x00b\x00\x01",          # U+0000 in a topic [MQTT-1.5.3-2]
    b"\x00\x09ab",                       # a string longer than the packet
])
def test_malformed_publish_bodies_are_refused(body):
    with pytest.raises(MalformedPacket):
        protocol.decode_publish(0x32, body, 0, len(body))


def test_subscribe_needs_a_filter_and_a_valid_qos():
    with pytest.raises(MalformedPacket):
        protocol.decode_subscribe(b"\x00\x01", 0, 2)
    with pytest.raises(MalformedPacket):
        protocol.decode_subscribe(b"\x00\x01\x00\x01a\x03", 0, 6)
    assert protocol.decode_subscribe(b"\x00\x01\x00\x01a\x02", 0, 6) == (1, [("a", 2)])


@pytest.mark.parametrize("topic_filter,valid", [
    ("a/b", True), ("#", True), ("a/#", True), ("+/b/+", True), ("+", True),
    ("a/#/b", False), ("a#", False), ("a/b+", False), ("", False),
])
def test_topic_filter_rules(topic_filter, valid):
    assert protocol.is_valid_filter(topic_filter) is valid


def test_outgoing_encodes_each_variant_once_and_matches_the_plain_encoder():
    message = Outgoing("t/x", b"data")
    assert message.head(0, False) == protocol.publish("t/x", b"data", 0, 0)
    assert message.head(0, False) is message.head(0, False)
    assert message.head(1, True) + protocol.packet_id_bytes(5) + b"data" == \
        protocol.publish("t/x", b"data", 1, 5, retain=True)


# --- sessions ---

def test_session_in_flight_flows_and_resend_order():
    session = Session(("u", "c"), "u", Verdict.DEVICE, clean=False)
    first = session.track("a", b"1", 1)
    second = session.track("b", b"2", 2)
    assert session.released(second)  # PUBREC: a PUBREL is due
    assert not session.acknowledged(second, 1)  # a PUBACK does not end a QoS 2 flow
    resend = session.resend_packets()
    assert parse_publish(resend[0][0] & 0x0F, resend[0][2:]).dup
    assert resend[1] == ack_packet(PUBREL, second)
    assert session.acknowledged(first, 1) and session.acknowledged(second, 2)
    assert session.inflight is None


def test_session_forget_topic_drops_queued_and_in_flight_copies():
    session = Session(("u", "c"), "u", Verdict.DEVICE, clean=False)
    session.enqueue("cmd", b"old", 1)
    session.enqueue("other", b"x", 1)
    session.track("cmd", b"older", 1)
    session.forget_topic("cmd")
    assert list(session.queue) == [("other", b"x", 1)] and session.inflight is None


def test_sessions_and_connections_are_slotted():
    session = Session(("u", "c"), "u", Verdict.DEVICE, clean=True)
    assert not hasattr(session, "__dict__")
    assert not hasattr(MqttConnection.__new__(MqttConnection), "__dict__")


# --- the shared sweep ---

def test_deadline_wheel_hands_out_items_once_never_early():
    wheel: DeadlineWheel[str] = DeadlineWheel(0.5)
    wheel.add(10.2, "a")
    wheel.add(10.7, "b")
    wheel.add(30.0, "c")
    assert list(wheel.due(10.1)) == []
    assert list(wheel.due(10.5)) == ["a"]
    assert list(wheel.due(10.6)) == []
    wheel.add(10.0, "late")  # already due: handed out by the next sweep
    assert list(wheel.due(11.0)) == ["b", "late"]
    assert list(wheel.due(29.9)) == []
    assert list(wheel.due(31)) == ["c"] and len(wheel) == 0


# --- the per-turn handshake gate ---

async def test_turn_gate_admits_at_most_per_turn_each_loop_turn():
    gate = TurnGate(per_turn=2)
    turn = 0
    admitted_at: list[int] = []

    async def ticker():
        nonlocal turn
        while True:
            await asyncio.sleep(0)
            turn += 1

    async def enter():
        await gate.enter()
        admitted_at.append(turn)

    tick = asyncio.ensure_future(ticker())
    await asyncio.wait_for(asyncio.gather(*(enter() for _ in range(7))), 2)
    tick.cancel()
    assert len(admitted_at) == 7
    per_turn = {t: admitted_at.count(t) for t in set(admitted_at)}
    assert max(per_turn.values()) <= 2 and len(per_turn) >= 4


async def test_turn_gate_skips_cancelled_waiters():
    gate = TurnGate(per_turn=1)
    await gate.enter()
    doomed = asyncio.ensure_future(gate.enter())
    survivor = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.wait_for(survivor, 1)


# --- on the wire ---

async def test_pubrel_for_an_unknown_packet_id_gets_its_pubcomp(lab):
    """[MQTT-4.3.3]: the receiver answers every PUBREL with PUBCOMP, known id or not."""
    client = RawClient(lab.mqtt_port)
    assert (await client.connect("rel"))[1] == 0
    client.send(ack_packet(PUBREL, 4242))
    kind, _, body = await client.read(timeout=3)
    assert (kind, body) == (PUBCOMP, b"\x10\x92")
    await client.close()


async def test_a_resent_qos2_publish_is_routed_once(lab):
    sub = RawClient(lab.mqtt_port)
    assert (await sub.connect("sub"))[1] == 0
    await sub.subscribe(("q2/t", 2))
    pub = RawClient(lab.mqtt_port)
    assert (await pub.connect("pub"))[1] == 0
    pub.send(publish_packet("q2/t", b"once", 2, 9))
    pub.send(publish_packet("q2/t", b"once", 2, 9, dup=True))  # its PUBREC was lost, say
    assert [(await pub.read())[0] for _ in range(2)] == [PUBREC, PUBREC]
    pub.send(ack_packet(PUBREL, 9))
    assert (await pub.read())[0] == PUBCOMP
    assert (await sub.message()).payload == b"once"
    assert await sub.no_message()
    await sub.close()
    await pub.close()


async def test_packets_split_across_segments_and_pipelined_in_one(lab):
    sub = RawClient(lab.mqtt_port)
    assert (await sub.connect("sub"))[1] == 0
    await sub.subscribe(("seg/#", 0))
    pub = RawClient(lab.mqtt_port)
    await pub.open()
    data = connect_packet("pub") + subscribe_packet(1, [("x/y", 0)]) + b"".join(
        publish_packet(f"seg/{i}", b"p" * i, 0) for i in range(20))
    for index in range(0, len(data), 7):
        pub.send(data[index:index + 7])
        await pub.writer.drain()
    got = [await sub.message() for _ in range(20)]
    assert [m.topic for m in got] == [f"seg/{i}" for i in range(20)]
    kinds = [(await pub.read())[0] for _ in range(2)]
    assert kinds == [2, 9]  # CONNACK, then SUBACK
    await sub.close()
    await pub.close()


async def test_a_report_pauses_its_connection_until_it_is_committed(otad):
    """While a report is applied nothing more is read from that connection: later packets wait in
    order, and another device is served meanwhile."""
    password = await otad.add_device("dev1", 1)
    other = await otad.add_device("dev2", 1)
    gate = asyncio.Event()
    ingest = otad.daemon.services.ingest
    original = ingest.submit

    async def slow_submit(device_name, payload):
        await gate.wait()
        return await original(device_name, payload)

    ingest.submit = slow_submit
    try:
        client = RawClient(otad.mqtt_port)
        assert (await client.connect("dev1", "dev1", password))[1] == 0
        client.send(publish_packet("/oc/devices/dev1/sys/ota/report", b'{"status":"downloading"}', 1, 1))
        client.send(bytes([0xC0, 0x00]))  # PINGREQ, after the report
        assert await client.no_message(within=0.3)
        with pytest.raises((asyncio.TimeoutError, TimeoutError)):
            await client.read(timeout=0.3)  # no PUBACK and no PINGRESP yet
        bystander = RawClient(otad.mqtt_port)
        assert (await bystander.connect("dev2", "dev2", other))[1] == 0
        await bystander.close()
        gate.set()
        kinds = [(await client.read(timeout=3))[0] for _ in range(2)]
        assert kinds == [4, 13]  # PUBACK, then PINGRESP
        await client.close()
    finally:
        ingest.submit = original
        gate.set()
