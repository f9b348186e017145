"""Passive OTA: admins pin a package per device; devices poll otaPassiveEnable."""

from __future__ import annotations

from aiohttp import web

from otad.http.auth import public
from otad.http.envelope import ok, read_json
from otad.http.keys import SERVICES, SETTINGS
from otad.http.urls import download_url
from otad.http.views import passive_pin_saved_view, passive_pin_view, passive_poll_view

routes = web.RouteTableDef()


@routes.post("/api/v2/otaPassive")
async def pin(request: web.Request) -> web.Response:
    saved = await request.app[SERVICES].passive.pin(await read_json(request))
    return ok(passive_pin_saved_view(saved))


@routes.get("/api/v2/otaPassive")
async def pins(request: web.Request) -> web.Response:
    return ok([passive_pin_view(pin) for pin in await request.app[SERVICES].passive.list()])


@routes.delete("/api/v2/otaPassive")
async def unpin(request: web.Request) -> web.Response:
    await request.app[SERVICES].passive.delete(request.rel_url.query.get("id"))
    return ok()


# (device, download base) -> (the pin it was rendered from, the reply body). Devices poll all day and
# the answer only changes with the pin, which the service hands out as the same object until then.
POLL_REPLIES = web.AppKey("poll_replies", dict)
_MAX_CACHED = 50_000


@routes.get("/api/v2/otaPassiveEnable")
@public
async def poll(request: web.Request) -> web.Response:
    pin = await request.app[SERVICES].passive.for_device(request.rel_url.query.get("deviceName"))
    public_url = request.app[SETTINGS].public_url
    key = (pin.device_name, public_url or f"{request.scheme}://{request.host}")
    replies = request.app[POLL_REPLIES]
    cached = replies.get(key)
    if cached is None or cached[0] is not pin:
        if len(replies) >= _MAX_CACHED:  # Host headers are the client's to choose: keep this bounded
            replies.clear()
        cached = replies[key] = (pin, ok(passive_poll_view(pin, download_url(request, public_url,
                                                                              pin.package.file_name))).body)
    return web.Response(body=cached[1], content_type="application/json", charset="utf-8")
