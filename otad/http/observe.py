"""One middleware for what every request needs observed: in-flight count (for a graceful stop),
request id (in the reply and the access log), and latency by route (for /metrics).

One layer instead of three: each aiohttp middleware is another coroutine per request, and the
passive poll devices repeat all day is otherwise dominated by such overhead (bench/http_bench.py).

In-flight counting exists because aiohttp's graceful shutdown marks every connection closing
first and from then on drops the bytes still arriving (``RequestHandler.data_received`` returns
early): an upload in progress stalls until the shutdown timeout and is cut. So the daemon stops
listening, waits here until in-flight requests are done (bounded), and only then lets aiohttp close
the connections.
"""

from __future__ import annotations

import asyncio
import os
import re
import time

from aiohttp import web

from otad.http.connections import CONNECTIONS
from otad.metrics import Metrics

_STARTED = web.RequestKey("otad_started", float)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class RequestObserver:
    def __init__(self, metrics: Metrics) -> None:
        self._latency = metrics.http_latency
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        self._count += 1
        self._idle.clear()
        request_id = request.headers.get("X-Request-Id", "")
        if not _REQUEST_ID.fullmatch(request_id):  # echoed and logged: only short, plain ids
            request_id = os.urandom(8).hex()
        request[_STARTED] = time.perf_counter()
        if (connections := request.app.get(CONNECTIONS)) is not None:
            connections.request_started(request.transport)  # a pipelined request is busy too
        try:
            response = await handler(request)
            response.headers["X-Request-Id"] = request_id
            return response
        except web.HTTPException as exc:
            exc.headers["X-Request-Id"] = request_id
            raise
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Latency and status are taken when the response starts: a file download decides on 206 or
        416 only then, after the middleware has returned."""
        started = request.get(_STARTED)
        if started is None:
            return
        resource = request.match_info.route.resource
        self._latency.labels(resource.canonical if resource is not None else "unmatched", request.method,
                             str(response.status)).observe(time.perf_counter() - started)

    async def wait_idle(self, timeout: float) -> bool:
        """True when every request finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
