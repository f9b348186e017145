"""xiaozhi-esp32: per-product pins and board activation for admins, and the boards' OTA check and
activate calls (protocol.md section 3)."""

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
from otad.http.views import timestamp, xiaozhi_pin_saved_view, xiaozhi_pin_view
from otad.service.xiaozhi import Accepted, ActivationRecord, BoardCheck, Offer

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


def _accepted_view(accepted: Accepted) -> dict:
    activation = accepted.activation
    return {"deviceName": accepted.device.name, "productId": accepted.device.product_id,
            "clientId": activation.client_id, "serialNumber": activation.serial_number,
            "newDevice": accepted.created_device, "activatedAt": timestamp(activation.accepted_at)}


def _pending_view(claim: ActivationRecord) -> dict:
    # No code: the operator reads it off the board's screen, which is what proves the board is theirs.
    return {"deviceName": claim.device_name, "clientId": claim.client_id, "productId": claim.product_id,
            "existingDevice": claim.existing_device, "serialNumber": claim.serial_number,
            "appVersion": claim.app_version, "boardType": claim.board_type, "remoteAddr": claim.remote_addr,
            "firstSeenAt": timestamp(claim.created_at), "lastSeenAt": timestamp(claim.seen_at),
            "expiresAt": timestamp(claim.expires_at)}


@routes.post("/api/v2/xiaozhi/activate")
async def activate(request: web.Request) -> web.Response:
    """``{"code": "123456"}``: accept the board that shows this code."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput('参数无效: expected {"code"}')
    return ok(_accepted_view(await request.app[SERVICES].xiaozhi.accept(body.get("code"))))


@routes.get("/api/v2/xiaozhi/pending")
async def pending(request: web.Request) -> web.Response:
    return ok([_pending_view(claim) for claim in await request.app[SERVICES].xiaozhi.pending()])


def _json_reply(value: dict, status: int = 200) -> web.Response:
    return web.json_response(value, status=status, dumps=lambda v: json.dumps(v, ensure_ascii=False))


def _host_offset_minutes() -> int:
    offset = datetime.now().astimezone().utcoffset()
    return int(offset.total_seconds() // 60) if offset else 0


def _board_headers(request: web.Request) -> tuple[str, str]:
    """The headers every board request carries: its MAC and its Client-Id."""
    device_id, client_id = request.headers.get("Device-Id"), request.headers.get("Client-Id")
    if not device_id or not client_id:
        raise MissingInput("参数缺失: the Device-Id and Client-Id headers are required")
    return device_id, client_id


@routes.post("/xiaozhi/ota/")
@routes.post("/xiaozhi/ota")
@public
async def board_check(request: web.Request) -> web.Response:
    """The board's check: not the envelope, but the plain object the firmware parses."""
    device_id, client_id = _board_headers(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput("参数无效: the body must be a JSON object")
    offer = await request.app[SERVICES].xiaozhi.check(BoardCheck(
        device_id, body, request.remote, client_id=client_id, serial_number=request.headers.get("Serial-Number")))
    return _json_reply(_check_reply(request, offer))


def _check_reply(request: web.Request, offer: Offer) -> dict:
    settings = request.app[SETTINGS]
    xiaozhi = settings.xiaozhi
    firmware: dict = {"version": offer.version, "url": ""}
    if offer.package is not None:
        firmware["url"] = download_url(request, settings.public_url, offer.package.file_name)
        if offer.force:
            firmware["force"] = 1
        if offer.delta is not None:  # a patch from what the board runs; boards that do not know it ignore it
            delta = offer.delta
            firmware["delta"] = {"fileName": delta.file_name,
                                 "url": download_url(request, settings.public_url, delta.file_name),
                                 "md5": delta.md5, "sha256": delta.sha256, "size": delta.size,
                                 "base": delta.base_version}
    reply: dict = {
        "server_time": {
            "timestamp": int(time.time() * 1000),
            "timezone_offset": xiaozhi.timezone_offset if xiaozhi.timezone_offset is not None
            else _host_offset_minutes(),
        },
        "firmware": firmware,
    }
    if offer.activation is not None:
        # A board not yet accepted: the code to show and the challenge for .../activate, and no
        # voice-server credentials (it does not use them before it is activated anyway).
        activation = offer.activation
        reply["activation"] = {"message": activation.message, "code": activation.code,
                               "challenge": activation.challenge, "timeout_ms": activation.timeout_ms}
        return reply
    # Only when configured: a board that sees "mqtt" switches its voice protocol to it.
    if xiaozhi.websocket:
        reply["websocket"] = xiaozhi.websocket
    if xiaozhi.mqtt:
        reply["mqtt"] = xiaozhi.mqtt
    return reply


@routes.post("/xiaozhi/ota/activate/")
@routes.post("/xiaozhi/ota/activate")
@public
async def board_activate(request: web.Request) -> web.Response:
    """The board's activate call (firmware: ``Ota::Activate``): 200 once accepted, 202 while pending."""
    device_id, client_id = _board_headers(request)
    # Boards without a serial number send "{}"; with one, algorithm, serial_number, challenge, hmac.
    body = await read_json(request) if request.body_exists else {}
    if not isinstance(body, dict):
        raise InvalidInput("参数无效: the body must be a JSON object")
    if await request.app[SERVICES].xiaozhi.board_activate(device_id, client_id, body):
        return _json_reply({"activated": True})
    return _json_reply({"activated": False, "message": "waiting for the operator to accept the code"}, status=202)


@routes.get("/xiaozhi/ota/")
@routes.get("/xiaozhi/ota")
@public
async def board_check_info(request: web.Request) -> web.Response:
    return web.Response(text="otad xiaozhi OTA endpoint is up; boards POST their check here.\n")
