"""xiaozhi-esp32: per-product pins for admins, and the boards' OTA check (protocol.md section 3)."""

from __future__ import annotations

import json
import time
from datetime import datetime

from aiohttp import web

from otad.errors import InvalidInput, MissingInput
from otad.http.auth import public
from otad.http.envelope import ok, read_json
from otad.http.keys import SERVICES, SETTINGS
from otad.http.urls import download_url
from otad.http.views import xiaozhi_pin_saved_view, xiaozhi_pin_view
from otad.service.xiaozhi import BoardCheck

routes = web.RouteTableDef()


@routes.post("/api/v2/xiaozhi/otaPassive")
async def pin(request: web.Request) -> web.Response:
    saved = await request.app[SERVICES].xiaozhi.pin(await read_json(request))
    return ok(xiaozhi_pin_saved_view(saved))


@routes.get("/api/v2/xiaozhi/otaPassive")
async def pins(request: web.Request) -> web.Response:
    return ok([xiaozhi_pin_view(pin) for pin in await request.app[SERVICES].xiaozhi.list()])


@routes.delete("/api/v2/xiaozhi/otaPassive")
async def unpin(request: web.Request) -> web.Response:
    await request.app[SERVICES].xiaozhi.delete(request.rel_url.query.get("id"))
    return ok()


def _host_offset_minutes() -> int:
    offset = datetime.now().astimezone().utcoffset()
    return int(offset.total_seconds() // 60) if offset else 0


@routes.post("/xiaozhi/ota/")
@routes.post("/xiaozhi/ota")
@public
async def board_check(request: web.Request) -> web.Response:
    """The board's check: not the envelope, but the plain object the firmware parses."""
    device_id, client_id = request.headers.get("Device-Id"), request.headers.get("Client-Id")
    if not device_id or not client_id:
        raise MissingInput("参数缺失: the Device-Id and Client-Id headers are required")
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput("参数无效: the body must be a JSON object")
    offer = await request.app[SERVICES].xiaozhi.check(BoardCheck(device_id, body, request.remote))

    settings = request.app[SETTINGS]
    xiaozhi = settings.xiaozhi
    firmware: dict = {"version": offer.version, "url": ""}
    if offer.package is not None:
        firmware["url"] = download_url(request, settings.public_url, offer.package.file_name)
        if offer.force:
            firmware["force"] = 1
    reply: dict = {
        "server_time": {
            "timestamp": int(time.time() * 1000),
            "timezone_offset": xiaozhi.timezone_offset if xiaozhi.timezone_offset is not None
            else _host_offset_minutes(),
        },
        "firmware": firmware,
    }
    # Only when configured: a board that sees "mqtt" switches its voice protocol to it.
    if xiaozhi.websocket:
        reply["websocket"] = xiaozhi.websocket
    if xiaozhi.mqtt:
        reply["mqtt"] = xiaozhi.mqtt
    return web.json_response(reply, dumps=lambda value: json.dumps(value, ensure_ascii=False))


@routes.get("/xiaozhi/ota/")
@routes.get("/xiaozhi/ota")
@public
async def board_check_info(request: web.Request) -> web.Response:
    return web.Response(text="otad xiaozhi OTA endpoint is up; boards POST their check here.\n")
