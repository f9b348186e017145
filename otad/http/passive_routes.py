"""Passive OTA: admins pin a package per device; devices poll otaPassiveEnable."""

from __future__ import annotations

import json

from aiohttp import web

from otad.http.auth import public
from otad.http.envelope import ok, read_json
from otad.http.keys import SERVICES, SETTINGS
from otad.http.urls import download_path
from otad.http.views import passive_pin_saved_view, passive_pin_view
from otad.service.offers import URL

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


# device -> (the offer it was rendered from, the reply before and after the download base). Devices
# poll all day and the answer only changes with the offer (a new pin, a signature about to expire),
# which the service hands out as the same object until then. Keyed only by what the server controls: an existing device with a pin (so no
# bigger than the registry); the base, which may come from the client's Host header, is put in
# per request.
POLL_REPLIES = web.AppKey("poll_replies", dict)
_MARK = "\0otad-download-base\0"  # no URL contains NUL characters
_MARK_JSON = json.dumps(_MARK)[1:-1].encode()  # how it appears in the rendered reply


@routes.get("/api/v2/otaPassiveEnable")
@public
async def poll(request: web.Request) -> web.Response:
    offer = await request.app[SERVICES].passive.offer(request.rel_url.query.get("deviceName"))
    replies = request.app[POLL_REPLIES]
    cached = replies.get(offer.device_name)
    if cached is None or cached[0] is not offer:
        body = ok({**offer.fields, URL: _MARK + download_path(offer.fields["fileName"])}).body
        head, _, tail = body.partition(_MARK_JSON)
        cached = replies[offer.device_name] = (offer, head, tail)
    public_url = request.app[SETTINGS].public_url
    base = public_url or f"{request.scheme}://{request.host}"
    body = cached[1] + json.dumps(base, ensure_ascii=False)[1:-1].encode() + cached[2]
    return web.Response(body=body, content_type="application/json", charset="utf-8")
