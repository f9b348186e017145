"""The pieces that replace amqtt internals: light queue/event, the per-turn handshake gate."""

from __future__ import annotations

import asyncio

import pytest

from otad.mqtt.admission import TurnGate
from otad.mqtt.light import LightEvent, LightQueue


async def test_light_queue_is_fifo_and_wakes_a_waiting_getter():
    queue = LightQueue()
    assert queue.empty() and queue.qsize() == 0
    getter = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("a")
    await queue.put("b")
    assert await asyncio.wait_for(getter, 1) == "a"
    assert queue.qsize() == 1 and queue.get_nowait() == "b"
    with pytest.raises(asyncio.QueueEmpty):
        queue.get_nowait()


async def test_light_queue_cancelled_getter_does_not_swallow_an_item():
    queue = LightQueue()
    cancelled = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    waiting = asyncio.ensure_future(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("item")
    assert await asyncio.wait_for(waiting, 1) == "item"


async def test_light_event_wakes_all_waiters_and_stays_set():
    event = LightEvent()
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert event.is_set() and await event.wait()
    event.clear()
    assert not event.is_set()


async def test_turn_gate_admits_at_most_per_turn_each_loop_turn():
    gate = TurnGate(per_turn=2)
    turn = 0
    admitted_at: list[int] = []

    async def ticker():
        nonlocal turn
        while True:
            await asyncio.sleep(0)
            turn += 1

    async def enter():
        await gate.enter()
        admitted_at.append(turn)

    tick = asyncio.ensure_future(ticker())
    await asyncio.wait_for(asyncio.gather(*(enter() for _ in range(7))), 2)
    tick.cancel()
    assert len(admitted_at) == 7
    per_turn = {t: admitted_at.count(t) for t in set(admitted_at)}
    assert max(per_turn.values()) <= 2 and len(per_turn) >= 4


async def test_turn_gate_skips_cancelled_waiters():
    gate = TurnGate(per_turn=1)
    await gate.enter()
    doomed = asyncio.ensure_future(gate.enter())
    survivor = asyncio.ensure_future(gate.enter())
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.wait_for(survivor, 1)
