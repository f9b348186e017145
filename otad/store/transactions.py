"""Store writes that, once begun, run to their end: a cancelled caller never leaves one half-entered.

tortoise's SQLite transaction takes the connection's one lock and then awaits ``BEGIN``; a task
cancelled between the two never reaches the context's exit, so the lock stays taken and every later
query waits on it forever (a daemon that could no longer stop: CI saw its teardown hang; on
PostgreSQL the pooled connection would leak instead). Callers are cancelled in normal operation:
the daemon's stop cancels the campaign engine and the maintenance loop, aiohttp cancels handlers
still running at shutdown.

So every store method that opens a transaction is ``@shielded``: it runs in a task of its own (with
the caller's context, so the ORM's connections are the caller's) that a cancelled caller leaves
running to its commit or rollback. ``drain`` waits for the ones still running before the database
is closed: they are found by their task name among the loop's tasks, so no registry is kept here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_TASK_NAME = "otad-store-write"


def shielded(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    @functools.wraps(method)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        task = asyncio.get_running_loop().create_task(method(*args, **kwargs), name=_TASK_NAME)
        return await asyncio.shield(task)  # a cancelled caller gets CancelledError; the write goes on

    return run


async def drain(timeout: float = 10.0) -> None:
    """Wait (bounded) for the shielded writes still running, whose callers were cancelled."""
    mine = {task for task in asyncio.all_tasks() if task.get_name() == _TASK_NAME}
    if not mine:
        return
    done, pending = await asyncio.wait(mine, timeout=timeout)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.warning("a store write whose caller had gone failed: %r", task.exception())
    if pending:
        log.warning("%d store write(s) still running after %.0f s at close", len(pending), timeout)
