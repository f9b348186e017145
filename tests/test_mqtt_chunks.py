"""Firmware over MQTT in chunks (docs/chunks.md) on the real embedded broker, with real clients: paho
as the device, a raw socket where the test must hold bytes back."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import struct

import aiohttp
import pytest

from tests.conftest import db_query, eventually, free_port, make_settings, running_otad
from tests.mosquitto import mosquitto  # noqa: F401 (the fixture)
from tests.mqtt_device import MqttDevice
from tests.s3 import s3_server  # noqa: F401 (the fixture)
from tests.rawmqtt import PINGREQ, PINGRESP, PUBLISH, RawClient, connect_packet, packet, publish_packet, subscribe_packet

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
    assert length < 512  # docs/chunks.md: a device may keep the header in 512 bytes
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
    """The state of the device's latest upgrade."""
    [(state,)] = db_query(otad.settings, "SELECT u.state FROM upgrade u JOIN device d ON d.id = u.device_id "
                                         "WHERE d.name = ? ORDER BY u.id DESC LIMIT 1", (name,))
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
        ({"fileName": file_name, "offset": 0, "size": 16, "id": "x" * 65}, 1001, "badRequest"),
        ({"fileName": file_name + "x" * 40, "offset": 0, "size": 16}, 1001, "badRequest"),  # over 64: never cut
        ({"fileName": file_name, "offset": 0, "size": 16, "id": "\u00e9t\u00e9"}, 1001, "badRequest"),
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

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, count: int) -> bytes:
        return self._recv_exactly(count)

    def _recv_exactly(self, count: int) -> bytes:
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

    def open_session(self, name: str, password: str, client_id: str = "stalled", qos: int = 0) -> None:
        self.send(connect_packet(client_id, name, password))
        head = self._exactly(1)
        assert self._exactly(self._packet_length())[1] == 0 and head[0] >> 4 == 2  # CONNACK accepted
        self.send(subscribe_packet(1, [(response_topic(name), qos)]))
        self._exactly(1), self._exactly(self._packet_length())  # SUBACK

    def start(self, name: str, password: str, file_name: str) -> None:
        self.open_session(name, password)
        self.send(publish_packet(request_topic(name), json.dumps(
            {"fileName": file_name, "offset": 0, "size": BIG}).encode(), 0))
        assert self._exactly(1)[0] >> 4 == PUBLISH  # its chunk started; the rest stays unread

    def rest_of_publish(self, topic: str) -> bytes:
        """The payload of the QoS 0 PUBLISH whose first byte was read already."""
        body = self._exactly(self._packet_length())
        (topic_length,) = struct.unpack(">H", body[:2])
        assert body[2:2 + topic_length].decode() == topic
        return body[2 + topic_length:]

    def next_publish(self, topic: str) -> bytes:
        """The payload of the next PUBLISH (a QoS 0 one)."""
        assert self._exactly(1)[0] >> 4 == PUBLISH
        return self.rest_of_publish(topic)


class StalledWebSocketDevice(StalledDevice):
    """The same over MQTT over WebSocket: a raw handshake, masked binary frames out, and frames
    in read no further than the MQTT bytes asked for."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.sock.sendall(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
        head = bytearray()
        while not head.endswith(b"\r\n\r\n"):
            head += self._recv_exactly(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self._left = 0  # bytes of the current frame's payload not read yet

    def send(self, data: bytes) -> None:
        mask = os.urandom(4)
        length = len(data)
        head = bytes([0x82]) + (bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + struct.pack(">H", length))
        self.sock.sendall(head + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(data)))

    def _exactly(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            if not self._left:
                first, second = self._recv_exactly(2)
                assert first & 0x0F == 2, "not a binary frame"
                self._left = second & 0x7F
                if self._left == 126:
                    (self._left,) = struct.unpack(">H", self._recv_exactly(2))
                elif self._left == 127:
                    (self._left,) = struct.unpack(">Q", self._recv_exactly(8))
                continue
            part = self._recv_exactly(min(count - len(data), self._left))
            self._left -= len(part)
            data += part
        return bytes(data)


async def stalled_device(port: int, name: str, password: str, file_name: str,
                         kind: type[StalledDevice] = StalledDevice) -> StalledDevice:
    device = await asyncio.to_thread(kind, port)
    await asyncio.to_thread(device.start, name, password, file_name)
    return device


LIMITED = {"mqtt.chunk_max_size": BIG, "mqtt.max_packet_size": BIG + 4096, "mqtt.chunk_transfers_per_device": 1}


@pytest.mark.parametrize("transport", ["tcp", "websocket"])
async def test_chunk_transfers_in_flight_are_limited_per_device(tmp_path, transport):
    """Over WebSocket too: the chunk waits in otad's WebSocket sender, which pauses the
    connection's writing, so the slot is held as over TCP (review C2)."""
    settings = make_settings(tmp_path / "data", **LIMITED, **{"mqtt.ws_port": free_port()})
    async with running_otad(settings) as otad:
        image = os.urandom(BIG + 1000)
        password, package = await offered_device(otad, image=image)
        file_name = package["fileName"]
        if transport == "tcp":
            stalled = await stalled_device(otad.mqtt_port, "node1", password, file_name)
        else:
            stalled = await stalled_device(otad.daemon.mqtt_ws_port, "node1", password, file_name,
                                           StalledWebSocketDevice)
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
    # External mode: the broker's own packet limit applies, not the embedded mqtt.max_packet_size.
    external = load_settings({"mqtt": {"chunk_max_size": "1MiB", "mode": "external",
                                       "external_url": "mqtt://otad:secret@127.0.0.1:1883"}}, {}, {})
    assert external.mqtt.chunk_max_size == 1024**2


async def test_chunks_through_mosquitto_in_external_mode(tmp_path, mosquitto):
    settings = make_settings(tmp_path / "data", **{"mqtt.mode": "external", "mqtt.external_url": mosquitto.url,
                                                   "mqtt.provisioning": "mosquitto-dynsec"})
    async with running_otad(settings) as otad:
        password, package = await offered_device(otad)
        other_password = await otad.add_device("other", 3)
        device = MqttDevice(mosquitto.port, "node1", password)
        assert await device.connect() == 0
        assert await device.subscribe(response_topic("node1")) == [1]
        received = bytearray()
        while len(received) < len(IMAGE):
            header, data = await ask(device, "node1", {"fileName": package["fileName"], "offset": len(received),
                                                       "size": CHUNK})
            assert header["success"] is True and header["data"]["total"] == len(IMAGE)
            received += data
            if len(received) == 2 * CHUNK:  # interrupted, and resumed on a new connection
                await device.close()
                device = MqttDevice(mosquitto.port, "node1", password)
                assert await device.connect() == 0
                assert await device.subscribe(response_topic("node1")) == [1]
        assert hashlib.sha256(received).hexdigest() == package["sha256"]
        assert upgrade_state(otad, "node1") == "downloading"
        header, _ = await ask(device, "node1", {"fileName": package["fileName"], "offset": 0, "size": 10**6})
        assert header["data"]["reason"] == "tooLarge"

        # mosquitto's ACL (otad's dynsec roles): no device reads or forges another's chunks.
        other = MqttDevice(mosquitto.port, "other", other_password)
        assert await other.connect() == 0
        assert await other.subscribe(response_topic("node1")) == [0x80]
        await other.publish(request_topic("node1"), json.dumps(
            {"fileName": package["fileName"], "offset": 0, "size": 10}).encode())
        await device.publish(response_topic("node1"), b"\x01\x00\x02{}forged")
        assert await device.no_message(1.0)
        await other.close()
        await device.close()



async def test_emqx_hook_acl_lets_a_device_use_only_its_own_chunk_topics(tmp_path):
    from tests.test_emqx_hooks import SECRET, _call, hooks_server

    async with hooks_server(tmp_path, **{"mqtt.hook_secret": SECRET}) as (base, services), \
            aiohttp.ClientSession() as session:
        await services.devices.add([{"deviceName": "dev-1", "productId": 1}, {"deviceName": "dev-2", "productId": 1}])

        async def verdict(username, topic, action):
            body = {"username": username, "clientid": f"{username}-client", "topic": topic, "action": action}
            status, answer = await _call(session, f"{base}/api/v2/emqx/acl", body)
            assert status == 200
            return answer["result"]

        assert await verdict("dev-1", request_topic("dev-1"), "publish") == "allow"
        assert await verdict("dev-1", response_topic("dev-1"), "subscribe") == "allow"
        assert await verdict("dev-1", response_topic("dev-1"), "publish") == "deny"  # only otad sends chunks
        assert await verdict("dev-1", request_topic("dev-2"), "publish") == "deny"
        assert await verdict("dev-1", response_topic("dev-2"), "subscribe") == "deny"
        assert await verdict("otad", "$share/otad//oc/devices/+/sys/ota/chunk/request", "subscribe") == "allow"
        assert await verdict("otad", response_topic("dev-2"), "publish") == "allow"


async def test_chunks_are_read_by_range_from_an_s3_store(tmp_path, s3_server, monkeypatch):  # noqa: F811
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.new_bucket()
    async with running_otad(make_settings(tmp_path / "data", **{"firmware.url": f"s3://{bucket}/fw"})) as otad:
        password, package = await offered_device(otad)
        assert otad.daemon.services.firmware.path_of(package["fileName"]) is None  # no local file to read
        device = otad.device("node1", password)
        assert await device.connect() == 0
        assert await device.subscribe(response_topic("node1")) == [1]
        received = bytearray()
        while len(received) < len(IMAGE):
            header, data = await ask(device, "node1", {"fileName": package["fileName"], "offset": len(received),
                                                       "size": 32 * 1024})
            assert header["success"] is True, header
            received += data
        assert hashlib.sha256(received).hexdigest() == package["sha256"]
        await device.close()


async def test_requests_pipelined_over_websocket_are_served_one_after_another(tmp_path):
    """The same over MQTT over WebSocket, from a client with a tiny receive buffer."""
    settings = make_settings(tmp_path / "data", **{"mqtt.chunk_transfers_per_device": 1,
                                                   "mqtt.ws_port": free_port()})
    async with running_otad(settings) as otad:
        password, package = await offered_device(otad)
        client = await asyncio.to_thread(StalledWebSocketDevice, otad.daemon.mqtt_ws_port)
        await asyncio.to_thread(client.open_session, "node1", password, "pipeline")
        client.send(b"".join(publish_packet(request_topic("node1"), json.dumps(
            {"fileName": package["fileName"], "offset": offset, "size": CHUNK, "id": offset}).encode(), 0)
            for offset in range(0, len(IMAGE), CHUNK)))
        received = bytearray()
        while len(received) < len(IMAGE):
            header, data = parse_frame(await asyncio.to_thread(client.next_publish, response_topic("node1")))
            assert header["success"] is True, header
            assert header["data"]["id"] == header["data"]["offset"] == len(received)  # in order
            received += data
        assert received == IMAGE
        client.sock.close()


async def test_requests_pipelined_on_one_connection_are_served_one_after_another(tmp_path):
    """Backpressure: the next request of a connection is read once its chunk is on its way, so a
    device that sends many at once is paced, never refused as busy (one transfer per device here)."""
    settings = make_settings(tmp_path / "data", **{"mqtt.chunk_transfers_per_device": 1})
    async with running_otad(settings) as otad:
        password, package = await offered_device(otad)
        client = RawClient(otad.mqtt_port)
        assert (await client.connect("pipeline", "node1", password))[1] == 0
        assert await client.subscribe((response_topic("node1"), 1)) == [1]
        client.send(b"".join(publish_packet(request_topic("node1"), json.dumps(
            {"fileName": package["fileName"], "offset": offset, "size": CHUNK, "id": offset}).encode(), 0)
            for offset in range(0, len(IMAGE), CHUNK)))
        received = bytearray()
        while len(received) < len(IMAGE):
            header, data = parse_frame((await client.message()).payload)
            assert header["success"] is True, header
            assert header["data"]["id"] == header["data"]["offset"] == len(received)  # in order
            received += data
        assert received == IMAGE
        await client.close()


async def test_a_chunk_goes_only_to_the_connection_that_asked_for_it(otad):
    """A device's second connection, subscribed to the same response topic at QoS 0 and never
    reading, gets none of the chunks another connection asks for: otad holds no copy for it."""
    password, package = await offered_device(otad)
    idle = RawClient(otad.mqtt_port)
    assert (await idle.connect("idle", "node1", password))[1] == 0
    assert await idle.subscribe((response_topic("node1"), 0)) == [0]
    asking = RawClient(otad.mqtt_port)
    assert (await asking.connect("asking", "node1", password))[1] == 0
    assert await asking.subscribe((response_topic("node1"), 1)) == [1]
    received = bytearray()
    for _ in range(3):  # the whole image, three times over
        received.clear()
        while len(received) < len(IMAGE):
            await asking.publish(request_topic("node1"), json.dumps(
                {"fileName": package["fileName"], "offset": len(received), "size": CHUNK}).encode())
            header, data = parse_frame((await asking.message()).payload)
            assert header["success"] is True
            received += data
        assert received == IMAGE
    # What the idle connection has been sent meanwhile comes before the answer to its PINGREQ: nothing.
    idle.send(packet(PINGREQ, 0, b""))
    kind, _, _ = await idle.read()
    assert kind == PINGRESP
    await idle.close()
    await asking.close()


async def test_the_delta_patch_a_device_is_offered_comes_over_chunks_too(otad):
    from tests.test_delta import NEW, OLD, _build, _device_on, _upload, applied

    await _upload(otad, "fw-1.0", OLD, "1.0")
    device = await _device_on(otad, "on-base", "1.0", "fw-1.0")
    assert await device.subscribe(response_topic("on-base")) == [1]
    new = await _upload(otad, "fw-2.0", NEW, "2.0")
    [outcome] = (await _build(otad, new["id"]))[1]["data"]
    patch = outcome["patch"]
    header, _ = await ask(device, "on-base", {"fileName": patch["fileName"], "offset": 0, "size": 100})
    assert header["data"]["reason"] == "notOffered"  # its package is not offered to the device yet

    await otad.enable("fw-2.0", "on-base")
    command = json.loads((await device.next_message()).payload)
    assert command["delta"]["fileName"] == patch["fileName"]
    received = bytearray()
    while len(received) < patch["size"]:
        header, data = await ask(device, "on-base", {"fileName": patch["fileName"], "offset": len(received),
                                                     "size": CHUNK})
        assert header["success"] is True and header["data"]["total"] == patch["size"]
        received += data
    assert hashlib.sha256(received).hexdigest() == patch["sha256"]
    assert applied(OLD, bytes(received)) == NEW
    assert upgrade_state(otad, "on-base") == "downloading"  # fetching the patch is evidence of its upgrade
    await device.close()
