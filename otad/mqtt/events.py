"""What the broker tells the rest of otad: device reports and presence.

A report is handed to the service before the broker acknowledges it (``report`` returns once it
is committed), and its reply goes back on the device's ``report_reply`` topic."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

ReportHandler = Callable[[str, bytes], Awaitable[bytes | None]]  # returns once durable, with the reply
PresenceHandler = Callable[[str, bool], None]


class DeviceEvents:
    def __init__(self, on_report: ReportHandler, on_presence: PresenceHandler,
                 reply: Callable[[str, bytes], None]) -> None:
        self._on_report = on_report
        self._on_presence = on_presence
        self._reply = reply

    async def report(self, device_name: str, payload: bytes) -> None:
        """Apply one report; returns when it is durable. Raises if it is not (the connection then
        ends unacknowledged and the device sends it again)."""
        reply = await self._on_report(device_name, payload)
        if reply is not None:
            self._reply(device_name, reply)

    def presence(self, device_name: str, online: bool) -> None:
        try:
            self._on_presence(device_name, online)
        except Exception:
            log.exception("recording presence of %s failed", device_name)
