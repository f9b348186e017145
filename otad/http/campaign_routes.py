"""Staged rollouts: create, inspect, pause, resume, cancel."""

from __future__ import annotations

from aiohttp import web

from otad.http.envelope import ok, read_json
from otad.http.keys import SERVICES
from otad.http.views import campaign_status_view, campaign_view

routes = web.RouteTableDef()


@routes.post("/api/v2/campaigns")
async def create(request: web.Request) -> web.Response:
    return ok(campaign_view(await request.app[SERVICES].campaigns.create(await read_json(request))))


@routes.get("/api/v2/campaigns")
async def campaigns(request: web.Request) -> web.Response:
    return ok([campaign_view(campaign) for campaign in await request.app[SERVICES].campaigns.list()])


@routes.get("/api/v2/campaigns/{id}")
async def campaign(request: web.Request) -> web.Response:
    return ok(campaign_status_view(await request.app[SERVICES].campaigns.status(request.match_info["id"])))


@routes.post("/api/v2/campaigns/{id}/{action:pause|resume|cancel}")
async def control(request: web.Request) -> web.Response:
    service = request.app[SERVICES].campaigns
    action = {"pause": service.pause, "resume": service.resume, "cancel": service.cancel}[request.match_info["action"]]
    return ok(campaign_view(await action(request.match_info["id"])))
