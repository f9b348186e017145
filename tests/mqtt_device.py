"""A device as the field has them: paho-mqtt over a real socket, wrapped for async tests."""

from __future__ import annotations

import asyncio
import queue
import threading

import paho.mqtt.client as mqtt


# paho 2.x reports MQTT 3.1.1 CONNACK return codes as MQTT 5 reason codes; map them back so the
# tests speak 3.1.1 (0 accepted, 1 bad protocol version, ..., 5 not authorized).
_V5_TO_V311 = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


class MqttDevice:
    def __init__(self, port: int, username: str | None, password: str | None, *, client_id: str | None = None,
                 clean_session: bool = True) -> None:
        self.port = port
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"{username}-client",
                                  clean_session=clean_session)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._connack: queue.Queue[int] = queue.Queue()
        self._subacks: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self.client.on_connect = lambda c, u, flags, rc, p: self._connack.put(_V5_TO_V311.get(rc.value, rc.value))
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        self.client.on_subscribe = self._on_subscribe
        self.disconnected = threading.Event()
        self.client.on_disconnect = lambda c, u, flags, rc, p: self.disconnected.set()
        # A refused device must not sit in paho's reconnect loop for the rest of the test.
        self.client.reconnect_delay_set(min_delay=30, max_delay=30)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            slot = self._subacks.setdefault(mid, queue.Queue())
        slot.put([code.value for code in reason_codes])

    async def connect(self, timeout: float = 5.0) -> int:
        """Connect and return the CONNACK return code (0 accepted, 5 not authorized)."""
        await asyncio.to_thread(self.client.connect, "127.0.0.1", self.port, 30)
        self.client.loop_start()
        code = await asyncio.to_thread(self._connack.get, True, timeout)
        if code != 0:
            await self.close()
        return code

    async def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and return the SUBACK return codes (granted QoS, or 0x80 refused)."""
        result, mid = self.client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._lock:
            slot = self._subacks.setdefault(mid, queue.Queue())
        return await asyncio.to_thread(slot.get, True, timeout)

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos)
        await asyncio.to_thread(info.wait_for_publish, 5)

    async def next_message(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return await asyncio.to_thread(self.messages.get, True, timeout)

    async def no_message(self, within: float = 1.0) -> bool:
        """True when nothing arrives within ``within`` seconds."""
        try:
            await asyncio.to_thread(self.messages.get, True, within)
        except queue.Empty:
            return True
        return False

    async def close(self) -> None:
        """A clean DISCONNECT, then stop paho's network thread."""
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)
