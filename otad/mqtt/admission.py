"""Pacing connection set-up so a connect storm cannot monopolise the event loop.

The broker and the HTTP API share one event loop. When a fleet reconnects at once (a gateway
reboot, a Wi-Fi outage ending), thousands of CONNECTs become ready in the same loop turn; each turn
then runs all of them before anything else, and an HTTP request waits whole seconds
(bench/broker_fanout.py measured p99 > 300 ms). ``TurnGate`` lets at most ``per_turn`` handshakes
start per loop turn; the rest wait, parked on a future, for the following turns. The total work is
the same; it is only spread so other callbacks run between slices.
"""

from __future__ import annotations

import asyncio
from collections import deque


class TurnGate:
    def __init__(self, per_turn: int) -> None:
        self._per_turn = per_turn
        self._left = per_turn
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._refill_pending = False

    async def enter(self) -> None:
        if self._left > 0 and not self._waiters:
            self._left -= 1
            self._schedule_refill()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._schedule_refill()
        await waiter

    def _schedule_refill(self) -> None:
        if not self._refill_pending:
            self._refill_pending = True
            asyncio.get_running_loop().call_soon(self._refill)

    def _refill(self) -> None:
        """Runs once per loop turn while anyone is waiting: admit the next ``per_turn``."""
        self._refill_pending = False
        self._left = self._per_turn
        while self._left and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a waiter whose connection was cancelled meanwhile
                waiter.set_result(None)
                self._left -= 1
        if self._waiters:
            self._schedule_refill()
