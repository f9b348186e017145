"""Firmware over MQTT in chunks (docs/chunks.md) on the real embedded broker, with real clients: paho
as the device, a raw socket where the test must hold bytes back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct

import pytest

from tests.conftest import db_query, eventually, make_settings, running_otad
from tests.mqtt_device import MqttDevice
from tests.rawmqtt import PUBLISH, connect_packet, publish_packet, subscribe_packet

IMAGE = os.urandom(200_000)
CHUNK = 16 * 1024


def request_topic(device: str) -> str:
    return f"/oc/devices/{device}/sys/ota/chunk/request"


def response_topic(device: str) -> str:
    return f"/oc/devices/{device}/sys/ota/chunk/response"


def parse_frame(payload: bytes) -> tuple[dict, bytes]:
    """The frame as a device reads it: version 1, a big-endian u16 header length, the JSON header,
    then the bytes; an independent reading of docs/chunks.md, not otad's code."""
    assert payload[0] == 1
    (length,) = struct.unpack(">H", payload[1:3])
    header = json.loads(payload[3:3 + length])
    data = payload[3 + length:]
    if header["success"]:
        assert len(data) == header["data"]["size"]
    else:
        assert data == b""
    return header, data


async def ask(device: MqttDevice, name: str, body: dict | bytes) -> tuple[dict, bytes]:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    await device.publish(request_topic(name), payload)
    message = await device.next_message()
    assert message.topic == response_topic(name)
    return parse_frame(message.payload)


async def offered_device(otad, name: str = "node1", image: bytes = IMAGE) -> tuple[str, dict]:
    """A registered device with an open upgrade of ``image``: (password, package)."""
    password = await otad.add_device(name, 3)
    status, body = await otad.upload("fw", 3, image)
    assert status == 200, body
    status, body = await otad.enable("fw", name)
    assert status == 200, body
    return password, (await otad.request("GET", "/api/v2/otaList"))[1]["data"][0]


def upgrade_state(otad, name: str) -> str:
    [(state,)] = db_query(otad.settings, "SELECT u.state FROM upgrade u JOIN device d ON d.id = u.device_id "
                                         "WHERE d.name = ?", (name,))
    return state


async def test_a_device_downloads_a_whole_image_over_chunks_resuming_after_a_disconnect(otad):
    password, package = await offered_device(otad)
    file_name = package["fileName"]
    assert upgrade_state(otad, "node1") == "notified"

    received = bytearray()
    device = otad.device("node1", password)
    assert await device.connect() == 0
    assert await device.subscribe(response_topic("node1")) == [1]
    for _ in range(4):
        header, data = await ask(device, "node1", {"fileName": file_name, "offset": len(received), "size": CHUNK,
                                                   "id": len(received)})
        assert header["errorCode"] == 200 and header["errorMsg"] == "成功"
        assert header["data"] == {"fileName": file_name, "offset": len(received), "size": CHUNK,
                                  "total": len(IMAGE), "id": len(received)}
        received += data
    # The evidence an HTTP download gives: the upgrade is under way.
    assert upgrade_state(otad, "node1") == "downloading"
    # Interrupted: a request goes out and the connection drops before its chunk is read.
    await device.publish(request_topic("node1"), json.dumps(
        {"fileName": file_name, "offset": len(received), "size": CHUNK}).encode())
    device.client.disconnect()
    await asyncio.to_thread(device.client.loop_stop)

    device = otad.device("node1", password)  # back, resuming at the offset it holds
    assert await device.connect() == 0
    assert await device.subscribe(response_topic("node1"), qos=0) == [0]
    while len(received) < len(IMAGE):
        header, data = await ask(device, "node1", {"fileName": file_name, "offset": len(received), "size": CHUNK})
        assert header["success"] is True and header["data"]["offset"] == len(received)
        received += data
    assert header["data"]["size"] == len(IMAGE) % CHUNK  # the last one is the rest
    assert hashlib.sha256(received).hexdigest() == package["sha256"] == hashlib.sha256(IMAGE).hexdigest()

    header, data = await ask(device, "node1", {"fileName": file_name, "offset": len(IMAGE), "size": CHUNK})
    assert header["success"] is False and header["errorCode"] == 1001 and data == b""
    assert header["data"]["reason"] == "offsetPastEnd" and header["data"]["offset"] == len(IMAGE)
    assert "past the end" in header["errorMsg"]
    await device.close()


async def test_bad_requests_get_clear_errors_and_the_connection_stays(otad):
    password, package = await offered_device(otad)
    file_name = package["fileName"]
    await otad.add_device("other", 3)
    status, _ = await otad.upload("unrelated", 3, b"another image")
    assert status == 200
    unrelated = next(p for p in (await otad.request("GET", "/api/v2/otaList"))[1]["data"] if p["name"] == "unrelated")

    device = otad.device("node1", password)
    assert await device.connect() == 0
    assert await device.subscribe(response_topic("node1")) == [1]
    cases = [
        ({"fileName": file_name, "offset": 0, "size": 32 * 1024 + 1}, 1001, "tooLarge"),
        ({"fileName": "../../../etc/passwd", "offset": 0, "size": 16}, 1001, "unknownFile"),
        ({"fileName": "0c5e3a1c-7f55-4d9b-9a55-3f1ce1a0b0a7.bin", "offset": 0, "size": 16}, 1001, "unknownFile"),
        ({"fileName": unrelated["fileName"], "offset": 0, "size": 16}, 3001, "notOffered"),
        ({"fileName": file_name, "offset": -1, "size": 16}, 1001, "badRequest"),
        ({"fileName": file_name, "offset": 0, "size": 0}, 1001, "badRequest"),
        ({"fileName": file_name, "offset": "0", "size": 16}, 1001, "badRequest"),
        (b"not json at all", 1001, "badRequest"),
        (b"[1, 2]", 1001, "badRequest"),
        (b"{" + b" " * 2000 + b"}", 1001, "badRequest"),
    ]
    for body, code, reason in cases:
        header, data = await ask(device, "node1", body)
        assert (header["success"], header["errorCode"], header["data"]["reason"]) == (False, code, reason), body
        assert header["errorMsg"] and data == b""
    assert "too large" in (await ask(device, "node1", cases[0][0]))[0]["errorMsg"]
    # Still connected and served.
    header, data = await ask(device, "node1", {"fileName": file_name, "offset": 100, "size": 10})
    assert header["success"] is True and data == IMAGE[100:110]
    assert not device.disconnected.is_set()
    await device.close()


async def test_a_passive_pin_offers_its_package_without_download_evidence_for_another_upgrade(otad):
    password = await otad.add_device("pinned", 3)
    image = os.urandom(5000)
    status, body = await otad.upload("pinfw", 3, image)
    assert status == 200
    file_name = body["data"]["fileName"]
    device = otad.device("pinned", password)
    assert await device.connect() == 0
    assert await device.subscribe(response_topic("pinned")) == [1]
    header, _ = await ask(device, "pinned", {"fileName": file_name, "offset": 0, "size": 100})
    assert header["errorCode"] == 3001  # not offered yet
    status, body = await otad.request("POST", "/api/v2/otaPassive", json={
        "deviceName": "pinned", "name": "pinfw", "description": "d", "versionName": "2.0"})
    assert status == 200, body
    header, data = await ask(device, "pinned", {"fileName": file_name, "offset": 4900, "size": 1000})
    assert header["success"] is True and header["data"]["size"] == 100 and data == image[4900:]
    await device.close()


async def test_a_device_cannot_ask_or_listen_on_another_devices_chunk_topics(otad):
    victim_password, package = await offered_device(otad, "victim")
    intruder_password = await otad.add_device("intruder", 3)
    victim = otad.device("victim", victim_password)
    assert await victim.connect() == 0
    assert await victim.subscribe(response_topic("victim")) == [1]
    intruder = otad.device("intruder", intruder_password)
    assert await intruder.connect() == 0
    assert await intruder.subscribe(response_topic("victim")) == [0x80]
    assert await intruder.subscribe("/oc/devices/+/sys/ota/chunk/response") == [0x80]
    assert await intruder.subscribe(response_topic("intruder")) == [1]

    request = json.dumps({"fileName": package["fileName"], "offset": 0, "size": 64}).encode()
    await intruder.publish(request_topic("victim"), request)  # dropped: not its topic
    assert await victim.no_message(0.5)
    assert await intruder.no_message(0.1)
    # Nor may a device forge chunks on its own response topic: only otad publishes there.
    await victim.publish(response_topic("victim"), b"\x01\x00\x02{}forged")
    assert await victim.no_message(0.5)
    # The intruder asking for the victim's file on its own topic: not offered to it.
    header, _ = await ask(intruder, "intruder", {"fileName": package["fileName"], "offset": 0, "size": 64})
    assert header["errorCode"] == 3001 and header["data"]["reason"] == "notOffered"
    assert upgrade_state(otad, "victim") == "notified"  # nothing was downloaded for it
    await victim.close()
    await intruder.close()


BIG = 6 * 1024 * 1024  # past the kernel's socket buffers (4 MiB at most here): some stays in otad's


class StalledDevice:
    """A connection (a plain blocking socket, a tiny receive buffer) that asks for a BIG chunk and
    then reads nothing past the PUBLISH's first byte: its chunk cannot leave otad's write buffer."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(20)
        self.sock.connect(("127.0.0.1", port))

    def _exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            part = self.sock.recv(min(count - len(data), 65536))
            assert part, "closed by otad"
            data += part
        return bytes(data)

    def _packet_length(self) -> int:
        length, shift = 0, 0
        while True:
            byte = self._exactly(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return length

    def start(self, name: str, password: str, file_name: str) -> None:
        self.sock.sendall(connect_packet("stalled", name, password))
        head = self._exactly(1)
        assert self._exactly(self._packet_length())[1] == 0 and head[0] >> 4 == 2  # CONNACK accepted
        self.sock.sendall(subscribe_packet(1, [(response_topic(name), 0)]))
        self._exactly(1), self._exactly(self._packet_length())  # SUBACK
        self.sock.sendall(publish_packet(request_topic(name), json.dumps(
            {"fileName": file_name, "offset": 0, "size": BIG}).encode(), 0))
        assert self._exactly(1)[0] >> 4 == PUBLISH  # its chunk started; the rest stays unread

    def rest_of_publish(self, topic: str) -> bytes:
        """The payload of the QoS 0 PUBLISH whose first byte was read already."""
        body = self._exactly(self._packet_length())
        (topic_length,) = struct.unpack(">H", body[:2])
        assert body[2:2 + topic_length].decode() == topic
        return body[2 + topic_length:]


async def stalled_device(port: int, name: str, password: str, file_name: str) -> StalledDevice:
    device = StalledDevice(port)
    await asyncio.to_thread(device.start, name, password, file_name)
    return device


LIMITED = {"mqtt.chunk_max_size": BIG, "mqtt.max_packet_size": BIG + 4096, "mqtt.chunk_transfers_per_device": 1}


async def test_chunk_transfers_in_flight_are_limited_per_device(tmp_path):
    async with running_otad(make_settings(tmp_path / "data", **LIMITED)) as otad:
        image = os.urandom(BIG + 1000)
        password, package = await offered_device(otad, image=image)
        file_name = package["fileName"]
        stalled = await stalled_device(otad.mqtt_port, "node1", password, file_name)
        assert otad.daemon.services.chunks.in_flight("node1") == 1

        device = otad.device("node1", password, client_id="second")
        assert await device.connect() == 0
        assert await device.subscribe(response_topic("node1")) == [1]
        header, data = await ask(device, "node1", {"fileName": file_name, "offset": 0, "size": 100, "id": "b1"})
        assert (header["success"], header["errorCode"], header["data"]["reason"]) == (False, 999, "busy")
        assert header["data"]["id"] == "b1" and "in flight" in header["errorMsg"]

        # The stalled connection reads its chunk at last: its slot is free again.
        header, data = parse_frame(await asyncio.to_thread(stalled.rest_of_publish, response_topic("node1")))
        assert header["success"] is True and data == image[:BIG]
        await eventually(lambda: otad.daemon.services.chunks.in_flight("node1") == 0)
        header, data = await ask(device, "node1", {"fileName": file_name, "offset": BIG, "size": 5000})
        assert header["success"] is True and data == image[BIG:]
        stalled.sock.close()
        await device.close()


async def test_a_device_that_drops_mid_chunk_frees_its_transfer(tmp_path):
    async with running_otad(make_settings(tmp_path / "data", **LIMITED)) as otad:
        password, package = await offered_device(otad, image=os.urandom(BIG))
        stalled = await stalled_device(otad.mqtt_port, "node1", password, package["fileName"])
        assert otad.daemon.services.chunks.in_flight("node1") == 1
        stalled.sock.close()
        await eventually(lambda: otad.daemon.services.chunks.in_flight("node1") == 0)


def test_chunk_size_must_fit_the_packet_size():
    from otad.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="mqtt.chunk_max_size"):
        load_settings({"mqtt": {"chunk_max_size": "1MiB"}}, {}, {})
    settings = load_settings({}, {"OTAD_CHUNK_MAX_SIZE": "4096", "OTAD_CHUNK_TRANSFERS_PER_DEVICE": "3"}, {})
    assert (settings.mqtt.chunk_max_size, settings.mqtt.chunk_transfers_per_device) == (4096, 3)
