"""Log lines that a flood must not multiply: one line per interval, with how many it stands for."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """``warning(...)`` logs at most once per ``interval`` seconds; the next line says how many
    were held back. Bad input from one misbehaving device stays a few lines, not a log flood."""

    def __init__(self, logger: logging.Logger, what: str, interval: float = 10.0) -> None:
        self._logger = logger
        self._what = what
        self._interval = interval
        self._next = 0.0
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        held, self._held, self._next = self._held, 0, now + self._interval
        suffix = f" ({held} more {self._what} in the last {self._interval:.0f} s not logged)" if held else ""
        self._logger.warning("%s " + message + "%s", self._what, *args, suffix)
