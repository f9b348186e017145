"""Counting requests in progress, so shutdown can wait for them.

aiohttp's own graceful shutdown marks every connection closing first, and from then on drops the
bytes still arriving (``RequestHandler.data_received`` returns early): an upload in progress stalls
until the shutdown timeout and is cut. So the daemon stops listening, waits here until in-flight
requests are done (bounded), and only then lets aiohttp close the connections.
"""

from __future__ import annotations

import asyncio

from aiohttp import web


class InFlight:
    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        self._count += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when every request finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
