"""Per-device quotas: one device pushing against a limit is bounded, the others are not touched,
and the command otad keeps for a device is never what a quota takes away."""

from __future__ import annotations

import contextlib
import json
import os

from otad.mqtt.broker import Broker
from tests.conftest import eventually, make_settings, start_otad
from tests.rawmqtt import PUBACK, PUBCOMP, PUBREC, PUBREL, RawClient, ack_packet, publish_packet

COMMAND = "/oc/devices/{}/sys/ota"
DATA = "/oc/devices/{}/data"


@contextlib.asynccontextmanager
async def running(tmp_path, **flags):
    instance = await start_otad(make_settings(tmp_path / "data", **flags))
    try:
        yield instance
    finally:
        await instance.stop()


def broker_of(otad) -> Broker:
    return otad.daemon._broker._broker  # the embedded broker's core, for its counted bytes


async def client(otad, device: str, password: str, client_id: str, **options) -> RawClient:
    raw = RawClient(otad.mqtt_port, auto_ack=options.pop("auto_ack", True))
    _, code = await raw.connect(client_id, device, password, **options)
    assert code == 0
    return raw


async def offline_subscriber(otad, device: str, password: str, client_id: str, topic_filter: str):
    """A persistent session subscribed to ``topic_filter`` whose client has gone."""
    raw = await client(otad, device, password, client_id, clean=False)
    assert await raw.subscribe((topic_filter, 1)) == [1]
    await raw.disconnect()
    broker = broker_of(otad)
    await eventually(lambda: broker._sessions[(device, client_id)].connection is None)
    return broker._sessions[(device, client_id)]


async def drain(raw: RawClient) -> list[tuple[str, bytes]]:
    """Every message that arrives until none does for half a second."""
    messages = []
    while True:
        try:
            message = await raw.message(0.5)
        except (TimeoutError, OSError, EOFError):
            return messages
        messages.append((message.topic, message.payload))


def refusals(otad, kind: str) -> float:
    return otad.daemon.metrics.registry.get_sample_value("otad_mqtt_quota_refusals_total", {"kind": kind}) or 0


async def hoard_qos2(otad, device: str, password: str, payload: bytes, count: int) -> RawClient:
    """QoS 2 PUBLISHes never released, written as fast as the socket takes them, until closed."""
    hoarder = await client(otad, device, password, f"{device}-qos2", clean=False)
    try:
        for packet_id in range(1, count + 1):
            hoarder.send(publish_packet(f"/oc/devices/{device}/q2/{packet_id}", payload, 2, packet_id))
            await hoarder.writer.drain()  # nothing piles up in this process's own buffers
    except ConnectionError:
        pass
    return hoarder


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_retained_quota_bounds_one_device_and_never_the_ota_command(tmp_path):
    async with running(tmp_path, **{"mqtt.max_retained_per_device": 2}) as otad:
        one, two = await otad.add_device("d1", 1), await otad.add_device("d2", 1)
        publisher = await client(otad, "d1", one, "d1-pub")
        for index in range(5):
            await publisher.publish(f"/oc/devices/d1/r{index}", b"kept?%d" % index, qos=1, retain=True)
        await publisher.publish("/oc/devices/d1/r0", b"replaced", qos=1, retain=True)  # a replacement fits
        other = await client(otad, "d2", two, "d2-pub")
        for index in range(2):
            await other.publish(f"/oc/devices/d2/r{index}", b"x", qos=1, retain=True)
        await otad.upload("fw", 1, b"firmware")
        status, body = await otad.enable("fw", "d1")  # retained by otad on the command topic
        assert status == 200, body

        reader = await client(otad, "d1", one, "d1-sub")
        await reader.subscribe(("/oc/devices/d1/#", 1))
        got = dict(await drain(reader))
        assert got.pop(COMMAND.format("d1"))  # the server's, not counted, not refused
        assert got == {"/oc/devices/d1/r0": b"replaced", "/oc/devices/d1/r1": b"kept?1"}
        reader2 = await client(otad, "d2", two, "d2-sub")
        await reader2.subscribe(("/oc/devices/d2/#", 1))
        assert len(await drain(reader2)) == 2  # the other device has its own quota
        assert broker_of(otad).retained_usage("d1")[0] == 2
        assert refusals(otad, "retained") == 3
        for raw in (publisher, other, reader, reader2):
            await raw.close()


async def test_retained_bytes_quota(tmp_path):
    async with running(tmp_path, **{"mqtt.max_retained_bytes_per_device": 1000}) as otad:
        one = await otad.add_device("d1", 1)
        publisher = await client(otad, "d1", one, "d1-pub")
        for index in range(10):
            await publisher.publish(f"/oc/devices/d1/r{index}", b"x" * 300, qos=1, retain=True)
        count, size = broker_of(otad).retained_usage("d1")
        assert count == 3 and size <= 1000
        await publisher.close()


async def test_full_offline_queue_drops_the_oldest_and_spares_other_sessions(tmp_path):
    async with running(tmp_path, **{"mqtt.max_queued_messages": 5}) as otad:
        one, two = await otad.add_device("d1", 1), await otad.add_device("d2", 1)
        await offline_subscriber(otad, "d1", one, "d1-sub", DATA.format("d1"))
        await offline_subscriber(otad, "d2", two, "d2-sub", DATA.format("d2"))
        publisher = await client(otad, "d1", one, "d1-pub")
        for index in range(20):
            await publisher.publish(DATA.format("d1"), b"%d" % index, qos=1)
        other = await client(otad, "d2", two, "d2-pub")
        for index in range(4):
            await other.publish(DATA.format("d2"), b"%d" % index, qos=1)

        back = await client(otad, "d1", one, "d1-sub", clean=False)
        assert [payload for _, payload in await drain(back)] == [b"%d" % i for i in range(15, 20)]
        back2 = await client(otad, "d2", two, "d2-sub", clean=False)
        assert [payload for _, payload in await drain(back2)] == [b"%d" % i for i in range(4)]
        assert refusals(otad, "queue") == 15
        for raw in (publisher, other, back, back2):
            await raw.close()


async def test_offline_queue_bytes_quota(tmp_path):
    async with running(tmp_path, **{"mqtt.max_queued_bytes": 10_000}) as otad:
        one = await otad.add_device("d1", 1)
        session = await offline_subscriber(otad, "d1", one, "d1-sub", DATA.format("d1"))
        publisher = await client(otad, "d1", one, "d1-pub")
        for index in range(50):
            await publisher.publish(DATA.format("d1"), b"x" * 1000, qos=1)
        assert 8_000 <= session.held_bytes <= 10_000 and len(session.queue) <= 10
        await publisher.close()


async def test_latest_ota_command_survives_a_full_offline_queue(tmp_path):
    async with running(tmp_path, **{"mqtt.max_queued_messages": 3}) as otad:
        one = await otad.add_device("d1", 1)
        await offline_subscriber(otad, "d1", one, "d1-dev", "/oc/devices/d1/#")
        await otad.upload("fw", 1, b"firmware")
        status, body = await otad.enable("fw", "d1")  # queued first: the oldest in the queue
        assert status == 200, body
        publisher = await client(otad, "d1", one, "d1-pub")
        for index in range(10):
            await publisher.publish(DATA.format("d1"), b"%d" % index, qos=1)

        device = await client(otad, "d1", one, "d1-dev", clean=False)
        got = await drain(device)
        assert len(got) == 3
        assert got[0][0] == COMMAND.format("d1") and json.loads(got[0][1])["version"]
        assert [payload for _, payload in got[1:]] == [b"8", b"9"]
        await publisher.close()
        await device.close()


async def test_inflight_window_holds_messages_until_acknowledged(tmp_path):
    async with running(tmp_path, **{"mqtt.max_inflight": 3}) as otad:
        one, two = await otad.add_device("d1", 1), await otad.add_device("d2", 1)
        slow = await client(otad, "d1", one, "d1-sub", auto_ack=False)
        await slow.subscribe((DATA.format("d1"), 1))
        fast = await client(otad, "d2", two, "d2-sub")
        await fast.subscribe((DATA.format("d2"), 1))
        publisher = await client(otad, "d1", one, "d1-pub")
        other = await client(otad, "d2", two, "d2-pub")
        for index in range(6):
            await publisher.publish(DATA.format("d1"), b"%d" % index, qos=1)
            await other.publish(DATA.format("d2"), b"%d" % index, qos=1)

        assert [payload for _, payload in await drain(fast)] == [b"%d" % i for i in range(6)]
        first = [await slow.message() for _ in range(3)]
        assert [m.payload for m in first] == [b"0", b"1", b"2"]
        assert await slow.no_message(within=0.5)  # the window is full: the rest wait, not dropped
        slow.send(ack_packet(PUBACK, first[0].packet_id))
        fourth = await slow.message()
        assert fourth.payload == b"3"
        assert await slow.no_message(within=0.3)
        for message in (first[1], first[2], fourth):
            slow.send(ack_packet(PUBACK, message.packet_id))
        rest = [await slow.message(), await slow.message()]
        assert [m.payload for m in rest] == [b"4", b"5"]
        for raw in (slow, fast, publisher, other):
            await raw.close()


async def test_unreleased_qos2_past_the_quota_closes_that_connection_only(tmp_path):
    async with running(tmp_path, **{"mqtt.max_unreleased_qos2": 3}) as otad:
        one, two = await otad.add_device("d1", 1), await otad.add_device("d2", 1)
        hoarder = await client(otad, "d1", one, "d1")
        for packet_id in range(1, 4):
            hoarder.send(publish_packet(DATA.format("d1"), b"x", 2, packet_id))
            kind, _, _ = await hoarder.read()
            assert kind == PUBREC
        hoarder.send(publish_packet(DATA.format("d1"), b"x", 2, 4))  # no PUBREL for any of them
        assert await hoarder.closed_by_server()

        polite = await client(otad, "d2", two, "d2")
        for _ in range(10):
            await polite.publish(DATA.format("d2"), b"y", qos=2)  # released: never near the quota
        polite.send(ack_packet(PUBREL, 999))  # unknown id: PUBCOMP all the same [MQTT-4.3.3-1]
        kind, _, body = await polite.read()
        assert kind == PUBCOMP and body == b"\x03\xe7"
        assert refusals(otad, "qos2") == 1
        await polite.close()
        await hoarder.close()


async def test_persistent_sessions_per_user_replace_the_oldest_disconnected(tmp_path):
    async with running(tmp_path, **{"mqtt.max_sessions_per_user": 3}) as otad:
        one, two = await otad.add_device("d1", 1), await otad.add_device("d2", 1)
        for index in range(6):
            await offline_subscriber(otad, "d1", one, f"d1-{index}", DATA.format("d1"))
        for index in range(2):
            await offline_subscriber(otad, "d2", two, f"d2-{index}", DATA.format("d2"))
        present = {}
        for device, password, client_id in [("d1", one, f"d1-{i}") for i in (5, 4, 3, 0)] + \
                [("d2", two, "d2-0"), ("d2", two, "d2-1")]:
            raw = RawClient(otad.mqtt_port)
            present[client_id], _ = await raw.connect(client_id, device, password, clean=False)
            await raw.close()
        assert present == {"d1-5": True, "d1-4": True, "d1-3": True, "d1-0": False, "d2-0": True, "d2-1": True}
        assert sum(1 for key in broker_of(otad)._sessions if key[0] == "d1") <= 3


async def test_one_device_cannot_make_the_broker_hold_hundreds_of_megabytes(tmp_path):
    """About 500 MB offered through retained messages, an offline queue, unreleased QoS 2 and
    session churn, with the default quotas: the broker keeps a few MB of it."""
    async with running(tmp_path) as otad:
        one = await otad.add_device("d1", 1)
        broker = broker_of(otad)
        queued = await offline_subscriber(otad, "d1", one, "d1-offline", "/oc/devices/d1/q/#")
        big = b"m" * 1_000_000
        before = rss()
        publisher = await client(otad, "d1", one, "d1-pub")
        for index in range(150):  # 150 MB retained on distinct topics
            await publisher.publish(f"/oc/devices/d1/r/{index}", big, qos=1, retain=True)
        for index in range(150):  # 150 MB for a session that is not there
            await publisher.publish(f"/oc/devices/d1/q/{index}", big, qos=1)
        await publisher.close()
        assert broker.retained_usage("d1")[1] <= 1024**2
        assert queued.held_bytes <= 4 * 1024**2
        for _ in range(2):  # up to 2 x 150 MB of QoS 2 never released, on one persistent session
            hoarder = await hoard_qos2(otad, "d1", one, big, 150)
            assert await hoarder.closed_by_server()
            await hoarder.close()
        assert len(broker._sessions[("d1", "d1-qos2")].received) <= 100
        for index in range(30):  # session churn: fresh client ids, each with a subscription
            await offline_subscriber(otad, "d1", one, f"d1-churn-{index}", "/oc/devices/d1/q/#")
        assert sum(1 for key in broker._sessions if key[0] == "d1") <= 10
        assert rss() - before < 50 * 1024**2
