"""Upgrade history and control: list, one upgrade with its timeline, cancel."""

from __future__ import annotations

from aiohttp import web

from otad.http.envelope import ok
from otad.http.keys import SERVICES
from otad.http.views import event_view, upgrade_view

routes = web.RouteTableDef()


@routes.get("/api/v2/upgrades")
async def upgrades(request: web.Request) -> web.Response:
    query = request.rel_url.query
    page = await request.app[SERVICES].upgrades.list(device_name=query.get("deviceName"), state=query.get("state"),
                                                     campaign=query.get("campaign"), page=query.get("page"),
                                                     page_size=query.get("pageSize"))
    return ok({"items": [upgrade_view(upgrade) for upgrade in page.items], "total": page.total, "page": page.page,
               "pageSize": page.page_size})


@routes.get("/api/v2/upgrades/{version}")
async def upgrade(request: web.Request) -> web.Response:
    service = request.app[SERVICES].upgrades
    query = request.rel_url.query
    found = await service.get(request.match_info["version"])
    timeline = await service.timeline(found, query.get("timelinePage"), query.get("timelinePageSize"))
    return ok({**upgrade_view(found), "timeline": [event_view(event) for event in timeline.items],
               "timelineTotal": timeline.total, "timelinePage": timeline.page,
               "timelinePageSize": timeline.page_size})


@routes.post("/api/v2/upgrades/{version}/cancel")
async def cancel(request: web.Request) -> web.Response:
    cancelled = await request.app[SERVICES].upgrades.cancel(request.match_info["version"])
    return ok(upgrade_view(cancelled))
