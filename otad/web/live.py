"""``GET /events``: the dashboard's live updates, as server-sent events.

One stream per open page, whatever the fleet size: the feed sums changes up once a second
(``otad.service.live``). The page's script applies them to the elements marked with
``data-upgrade``, ``data-device``, ``data-campaign`` and ``data-summary``.
"""

from __future__ import annotations

import json

from aiohttp import web

from otad.errors import NotLoggedIn, OtadError
from otad.service.live import LiveFeedClosed
from otad.web.keys import DASHBOARD
from otad.web.session import operator_of

routes = web.RouteTableDef()

# A comment line this often keeps proxies and the browser from dropping a quiet stream,
# and finds a closed one (aiohttp notices a gone client only when writing to it).
KEEPALIVE = 5.0


@routes.get("/events")
async def events(request: web.Request) -> web.StreamResponse:
    try:
        await operator_of(request)
    except NotLoggedIn:
        return web.Response(status=401, text="log in first\n")
    feed = request.app[DASHBOARD].services.live
    try:
        async with feed.stream() as stream:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                                   "X-Accel-Buffering": "no"})
            await response.prepare(request)
            await response.write(b"retry: 2000\n: connected\n\n")
            try:
                while True:
                    message = await stream.next(KEEPALIVE)
                    if message is None:
                        await response.write(b": keep-alive\n\n")
                    else:
                        await response.write(f"data: {json.dumps(message, separators=(',', ':'))}\n\n".encode())
            except (LiveFeedClosed, ConnectionResetError):
                pass
            return response
    except LiveFeedClosed:  # the daemon is stopping
        return web.Response(status=503, text="otad is stopping\n", headers={"Retry-After": "2"})
    except OtadError as error:  # too many streams open
        return web.Response(status=error.status, text=error.message + "\n",
                            headers={"Retry-After": str(getattr(error, "retry_after", 10))})
