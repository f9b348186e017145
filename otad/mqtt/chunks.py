"""Firmware over MQTT in chunks, the MQTT side (docs/chunks.md): the response frame, and the embedded
broker's handling of a request.

A response is one binary frame, so a device matches the bytes to its request without parsing them:

    byte 0       frame version, 1
    bytes 1-2    M, the length of the JSON header (unsigned, big-endian)
    bytes 3..    the JSON header (UTF-8, M bytes): the envelope {"success","errorCode","errorMsg","data"}
    then         the chunk's bytes: data.size of them (none when success is false)

The embedded broker sends the frame to the requesting connection only (if its session subscribes
to the response topic) and reads no further packet from that connection until its write buffer has
drained below the transport's high-water mark: the bytes otad holds for a device stay bounded by a
chunk or two per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from otad.mqtt.topics import chunk_requesting_device, ota_chunk_response_topic
from otad.service.chunks import ChunkReply, FirmwareChunks

if TYPE_CHECKING:
    from otad.mqtt.broker import Broker
    from otad.mqtt.connection import MqttConnection
    from otad.mqtt.sessions import Session

log = logging.getLogger(__name__)

FRAME_VERSION = 1
_DRAIN_TIMEOUT = 60.0  # seconds at most a connection has to take its chunk (less with a shorter keepalive)


def frame(reply: ChunkReply) -> bytes:
    """The response payload: version, header length, JSON header, the bytes."""
    header = json.dumps(reply.header, ensure_ascii=False, separators=(",", ":")).encode()
    return bytes([FRAME_VERSION]) + len(header).to_bytes(2, "big") + header + reply.data


class ChunkServer:
    """Serves the chunk requests devices publish on the embedded broker."""

    def __init__(self, broker: Broker, chunks: FirmwareChunks) -> None:
        self._broker = broker
        self._chunks = chunks

    def request_of(self, session: Session, topic: str) -> str | None:
        """The device whose chunk request a PUBLISH on ``topic`` is, if the session may publish it."""
        device = chunk_requesting_device(topic)
        if device is None or not self._broker.policy.may_publish(session.verdict, session.username, topic):
            return None
        return device

    def serve(self, connection: MqttConnection, device: str, publish: tuple) -> None:
        """Answer one request; the connection is blocked (not read) until ``unblock``."""
        self._broker.spawn(self._serve(connection, device, publish))

    async def _serve(self, connection: MqttConnection, device: str, publish: tuple) -> None:
        try:
            async with self._chunks.transfer(device, publish[4]) as reply:
                connection.published(*publish)  # acknowledged (and routed) as any publish
                # To the requesting connection only: it alone is paced by drained() below.
                self._broker.reply(connection, ota_chunk_response_topic(device), frame(reply), 1)
                if reply.data:
                    self._broker.metrics.bytes_served.inc(len(reply.data))
                    # Capped: a keepalive of 65535 s would otherwise hold the slot for 27 hours.
                    timeout = min(connection.keepalive or _DRAIN_TIMEOUT, _DRAIN_TIMEOUT)
                    if not await connection.drained(timeout):
                        log.info("MQTT client %s took no chunk bytes for %.0f s: closing", connection.describe(),
                                 timeout)
                        connection.close()
                        return
            connection.unblock()
        except asyncio.CancelledError:
            connection.close()
            raise
        except Exception:
            log.exception("MQTT client %s: serving a chunk failed; closing", connection.describe())
            connection.close()
