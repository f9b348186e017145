"""The overview: devices per product, firmware versions in the fleet, upgrades by state, live
campaigns."""

from __future__ import annotations

from aiohttp import web

from otad.web.keys import DASHBOARD
from otad.web.render import render
from otad.web.session import page

routes = web.RouteTableDef()


@routes.get("/")
@page
async def overview(request: web.Request) -> web.Response:
    summary = await request.app[DASHBOARD].services.fleet.overview()
    widest = max((version.devices for version in summary.versions), default=0)
    return render(request, "overview.html", overview=summary, widest=widest)
