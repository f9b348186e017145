"""Polls one URL in its own process until stdin closes, then prints the latencies (seconds) as JSON.

Run beside a load generator so the load's own event loop does not delay the measurement."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def main(url: str) -> None:
    latencies: list[float] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            started = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
    print(json.dumps(latencies))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
