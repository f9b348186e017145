"""What the broker tells the rest of otad: device reports and presence, through our own queue.

amqtt runs plugin callbacks as unawaited tasks and hides their failures below DEBUG (stack-notes).
Here the broker only drops an event in a queue; one named consumer task hands each to the service,
logs any failure loudly and carries on with the next."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

_MAX_PENDING = 10_000

ReportHandler = Callable[[str, bytes], Awaitable[bytes | None]]  # the reply, if any
PresenceHandler = Callable[[str, bool], None]


class DeviceEvents:
    def __init__(self, on_report: ReportHandler, on_presence: PresenceHandler,
                 reply: Callable[[str, bytes], None]) -> None:
        self._on_report = on_report
        self._on_presence = on_presence
        self._reply = reply
        # Bounded: a flood of reports is dropped (and logged) rather than held in memory.
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=_MAX_PENDING)
        self._consumer: asyncio.Task | None = None
        self._dropped = 0

    def inbound(self, device_name: str, payload: bytes) -> None:
        try:
            self._queue.put_nowait((device_name, payload))
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped % 1000 == 1:  # a flood must not become a flood of log lines too
                log.warning("dropping OTA reports (%d so far, latest from %s): %d reports are waiting",
                            self._dropped, device_name, _MAX_PENDING)

    def presence(self, device_name: str, online: bool) -> None:
        try:
            self._on_presence(device_name, online)
        except Exception:
            log.exception("recording presence of %s failed", device_name)

    def start(self) -> None:
        self._consumer = asyncio.create_task(self._consume(), name="otad-mqtt-reports")

    async def drain(self, timeout: float) -> None:
        """Wait (bounded) until every report already received is applied: the devices got their
        PUBACK and will not send them again."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            log.warning("%d OTA reports not applied at shutdown", self._queue.qsize())

    async def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
            self._consumer = None

    async def _consume(self) -> None:
        while True:
            device_name, payload = await self._queue.get()
            try:
                reply = await self._on_report(device_name, payload)
                if reply is not None:
                    self._reply(device_name, reply)
            except Exception:
                log.exception("handling an OTA report from %s failed; continuing", device_name)
            finally:
                self._queue.task_done()
