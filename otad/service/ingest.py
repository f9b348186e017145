"""Device reports from arrival to commit: group commit, retried until durable.

A transport hands each report to ``submit`` and waits: the wait ends when the report is committed
(or refused as bad input), and only then may the transport acknowledge it (MQTT PUBACK). The MQTT
adapter waits before reading the connection's next packet, so a device can have only one report in
here at a time and the queue is bounded by the number of connections: when applying falls behind,
the senders' TCP windows fill up (backpressure) and nothing is dropped.

One task applies whatever has queued up as one batch in one transaction. A batch that fails for a
reason that passes (a full disk, a busy database) is retried with backoff until it goes through;
its devices wait unacknowledged meanwhile, and re-send if their connection ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from otad.errors import StorageUnavailable
from otad.service.health import DATABASE, StorageHealth
from otad.service.logs import RateLimitedLog
from otad.service.reports import ReportReply, Reports

log = logging.getLogger(__name__)

_MAX_BACKOFF = 1.0
_WAKE_PER_TURN = 50


class ReportIngest:
    def __init__(self, reports: Reports, health: StorageHealth, max_batch: int = 2000) -> None:
        self._reports = reports
        self._health = health
        self._max_batch = max_batch
        self._pending: deque[tuple[str, bytes, asyncio.Future[ReportReply]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._failures = RateLimitedLog(log, "report batches not written")
        self.applied = 0  # reports committed since start (bench/ and metrics)

    async def submit(self, device_name: str, payload: bytes) -> ReportReply:
        """Apply one report; returns once it is committed (or refused), with the device's reply."""
        if self._task is None:
            raise RuntimeError("the report ingest is not running")
        future: asyncio.Future[ReportReply] = asyncio.get_running_loop().create_future()
        self._pending.append((device_name, payload, future))
        self._wakeup.set()
        return await future

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="otad-report-ingest")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or self._stopping:
            return
        error = task.exception()
        log.critical("the report ingest stopped: %r; reports are no longer applied", error)
        self._health.failing(DATABASE, f"report ingest stopped: {error!r}")
        for _, _, future in self._pending:
            if not future.done():
                future.set_exception(RuntimeError("the report ingest stopped"))

    async def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch being written (bounded), then stop. Reports not yet taken stay
        unacknowledged: their devices send them again to the next process."""
        if self._task is None:
            return
        task, self._task = self._task, None
        self._stopping = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            log.warning("report ingest still writing after %.0f s at shutdown; stopping it", timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()

    async def _run(self) -> None:
        while not self._stopping:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending and not self._stopping:
                batch = []
                while self._pending and len(batch) < self._max_batch:
                    item = self._pending.popleft()
                    if not item[2].done():  # a connection that ended no longer waits for its report
                        batch.append(item)
                if batch:
                    await self._apply(batch)
                    await asyncio.sleep(0)  # let the transports read and answer between batches

    async def _apply(self, batch: list[tuple[str, bytes, asyncio.Future[ReportReply]]]) -> None:
        items = [(device, payload) for device, payload, _ in batch]
        delay = 0.05
        while True:
            try:
                replies = await self._reports.apply_batch(items)
                break
            except StorageUnavailable as exc:
                self._health.failing(DATABASE, exc.message)
                self._failures.warning("(%d reports waiting, retrying): %s", len(self._pending) + len(batch),
                                       exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
            except Exception:
                log.exception("applying a batch of %d reports failed; applying them one at a time", len(items))
                replies = await self._one_at_a_time(items)
                break
        self._health.ok(DATABASE)
        for index, ((_, _, future), reply) in enumerate(zip(batch, replies)):
            if index and index % _WAKE_PER_TURN == 0:
                # Each answer wakes a connection (PUBACK, reply, its next packet): a few dozen per
                # loop turn, so an HTTP request waits for dozens, not for the whole batch.
                await asyncio.sleep(0)
            if future.done():
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)  # not applied: no PUBACK, the device sends it again
            else:
                self.applied += 1
                future.set_result(reply)

    async def _one_at_a_time(self, items: list[tuple[str, bytes]]) -> list[ReportReply | BaseException]:
        """Isolate the report that breaks a batch: the others are applied; it is not, and is not
        acknowledged either (a reply would say it was handled)."""
        replies: list[ReportReply | BaseException] = []
        for device, payload in items:
            while True:
                try:
                    replies.append(await self._reports.apply(device, payload))
                    break
                except StorageUnavailable as exc:
                    self._health.failing(DATABASE, exc.message)
                    await asyncio.sleep(_MAX_BACKOFF)
                except Exception as exc:
                    log.error("an OTA report from %s could not be applied (%r); it is not acknowledged", device, exc)
                    replies.append(exc)
                    break
        return replies
