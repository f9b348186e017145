"""The OpenAPI 3 document of every HTTP endpoint, served at /api/v2/openapi.json.

``tests/test_openapi.py`` compares the paths and methods here with the application's route table,
so an endpoint cannot be added or removed without this document following."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from otad import __version__
from otad.http.auth import public

routes = web.RouteTableDef()

_Q = "query"


def _param(name: str, where: str = _Q, required: bool = False, kind: str = "string", what: str = "") -> dict:
    return {"name": name, "in": where, "required": required, "schema": {"type": kind}, "description": what}


def _json(schema: dict | None = None) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


_ENVELOPE = {"$ref": "#/components/schemas/Envelope"}
_OK = {"200": {"description": "success envelope", "content": {"application/json": {"schema": _ENVELOPE}}},
       "default": {"description": "error envelope (errorCode and errorMsg say why)",
                   "content": {"application/json": {"schema": _ENVELOPE}}}}
_DEVICE_NAME = _param("deviceName", required=True, what="the device's name (its MQTT username)")
_ID = _param("id", required=True, kind="integer")
_VERSION = _param("version", "path", True, what="the upgrade's id, as sent in the OTA command")
_CAMPAIGN = _param("id", "path", True, "integer")
_BOARD_ACTIVATE = {"200": {"description": "accepted"}, "202": {"description": "still waiting for the operator"},
                   "404": {"description": "no pending activation: check again"}}

# (method, path) -> (summary, parameters, request body, public, responses)
OPERATIONS: dict[tuple[str, str], tuple[str, list, dict | None, bool, dict]] = {
    ("post", "/api/v2/login"): ("Log in; data is \"Bearer <token>\"", [], _json(), True, _OK),
    ("post", "/api/v2/otaUpload"): ("Upload a firmware package (multipart field 'file')", [
        _param("name", required=True), _param("productId", required=True, kind="integer"), _param("version"),
        _param("description")], {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}}}}, False, _OK),
    ("get", "/api/v2/otaList"): ("List packages", [], None, False, _OK),
    ("delete", "/api/v2/otaDelete"): ("Delete a package and its file", [_ID], None, False, _OK),
    ("post", "/api/v2/otaEnable"): ("Push a package to one device over MQTT", [
        _param("name", required=True), _DEVICE_NAME, _param("timeout", kind="integer", what="seconds")],
        None, False, _OK),
    ("post", "/api/v2/devices"): ("Register one device or a list of them; passwords are returned once", [],
                                  _json({"oneOf": [{"type": "object"}, {"type": "array"}]}), False, _OK),
    ("get", "/api/v2/devices"): ("List devices with what they last reported", [], None, False, _OK),
    ("delete", "/api/v2/devices"): ("Delete a device", [_DEVICE_NAME], None, False, _OK),
    ("get", "/api/v2/micro/{fileName}"): ("Download a firmware file (Range, If-Range, HEAD)", [
        _param("fileName", "path", True), _param("deviceName", what="marks the device's upgrade downloading")],
        None, True, {"200": {"description": "the file"}, "206": {"description": "a range of it"},
                     "404": {"description": "unknown file"}}),
    ("post", "/api/v2/otaDelta"): ("Build delta patches to a package now (detools, heatshrink; docs/delta.md)", [
        _param("id", required=True, kind="integer", what="the package the patches lead to"),
        _param("base", kind="integer", what="the package to patch from; default: the product's latest earlier ones")],
        None, False, _OK),
    ("get", "/api/v2/otaDelta"): ("List delta patches", [
        _param("id", kind="integer", what="only the patches to this package")], None, False, _OK),
    ("post", "/api/v2/otaPassive"): ("Pin a package for a device (passive OTA)", [], _json(), False, _OK),
    ("get", "/api/v2/otaPassive"): ("List passive pins", [], None, False, _OK),
    ("delete", "/api/v2/otaPassive"): ("Delete a passive pin", [_ID], None, False, _OK),
    ("get", "/api/v2/otaPassiveEnable"): ("What a polling device should install", [_DEVICE_NAME], None, True,
                                          _OK),
    ("post", "/api/v2/xiaozhi/otaPassive"): ("Pin a package for a product's xiaozhi boards", [], _json(), False,
                                             _OK),
    ("get", "/api/v2/xiaozhi/otaPassive"): ("List xiaozhi pins", [], None, False, _OK),
    ("delete", "/api/v2/xiaozhi/otaPassive"): ("Delete a xiaozhi pin", [_ID], None, False, _OK),
    ("post", "/xiaozhi/ota/"): ("A xiaozhi board's OTA check (not enveloped)", [
        _param("Device-Id", "header", True), _param("Client-Id", "header", True)], _json(), True,
        {"200": {"description": "server_time and firmware, or activation"}, "400": {"description": "bad request"}}),
    ("post", "/xiaozhi/ota"): ("Same, without the trailing slash", [
        _param("Device-Id", "header", True), _param("Client-Id", "header", True)], _json(), True,
        {"200": {"description": "server_time and firmware, or activation"}, "400": {"description": "bad request"}}),
    ("get", "/xiaozhi/ota/"): ("Says the endpoint is up", [], None, True, {"200": {"description": "text"}}),
    ("get", "/xiaozhi/ota"): ("Says the endpoint is up", [], None, True, {"200": {"description": "text"}}),
    ("post", "/api/v2/xiaozhi/activate"): ("Accept the xiaozhi board showing this code; it becomes a device",
                                           [], _json({"type": "object", "required": ["code"],
                                                      "properties": {"code": {"type": "string"}}}), False, _OK),
    ("get", "/api/v2/xiaozhi/pending"): ("xiaozhi boards waiting for activation (without their codes)", [], None,
                                         False, _OK),
    ("post", "/xiaozhi/ota/activate"): ("A xiaozhi board's activate call (not enveloped)", [
        _param("Device-Id", "header", True), _param("Client-Id", "header", True)], _json(), True, _BOARD_ACTIVATE),
    ("post", "/xiaozhi/ota/activate/"): ("Same, with a trailing slash", [
        _param("Device-Id", "header", True), _param("Client-Id", "header", True)], _json(), True, _BOARD_ACTIVATE),
    ("get", "/api/v2/upgrades"): ("Upgrade history, newest first, paged", [
        _param("deviceName"), _param("state"), _param("campaign", kind="integer"), _param("page", kind="integer"),
        _param("pageSize", kind="integer")], None, False, _OK),
    ("get", "/api/v2/upgrades/{version}"): ("One upgrade with one page of its timeline (oldest first)", [
        _VERSION, _param("timelinePage", kind="integer"), _param("timelinePageSize", kind="integer")], None, False,
        _OK),
    ("post", "/api/v2/upgrades/{version}/cancel"): ("Cancel an upgrade; its command is withdrawn", [_VERSION],
                                                    None, False, _OK),
    ("post", "/api/v2/campaigns"): ("Start a staged rollout", [], _json(), False, _OK),
    ("get", "/api/v2/campaigns"): ("List campaigns", [], None, False, _OK),
    ("get", "/api/v2/campaigns/{id}"): ("A campaign with counts per state and per stage", [_CAMPAIGN], None,
                                        False, _OK),
    ("post", "/api/v2/campaigns/{id}/{action}"): ("Pause, resume or cancel a campaign", [
        _CAMPAIGN, {"name": "action", "in": "path", "required": True,
                    "schema": {"type": "string", "enum": ["pause", "resume", "cancel"]}}], None, False, _OK),
    ("get", "/healthz"): ("Broker serving, database and firmware store taking writes", [], None, True,
                          {"200": {"description": "healthy"}, "503": {"description": "failing"}}),
    ("get", "/metrics"): ("Prometheus metrics", [], None, False, {"200": {"description": "text exposition"}}),
    ("get", "/api/v2/openapi.json"): ("This document", [], None, True, {"200": {"description": "OpenAPI 3"}}),
}


def document() -> dict[str, Any]:
    paths: dict[str, dict] = {}
    for (method, path), (summary, parameters, body, is_public, responses) in OPERATIONS.items():
        operation: dict[str, Any] = {"summary": summary, "parameters": parameters, "responses": responses}
        if body is not None:
            operation["requestBody"] = body
        if is_public:
            operation["security"] = []
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.0.3",
        "info": {"title": "otad", "version": __version__,
                 "description": "OTA update daemon. Replies are {success, errorCode, errorMsg, data}."},
        "paths": paths,
        "security": [{"token": []}],
        "components": {
            "securitySchemes": {"token": {"type": "apiKey", "in": "header", "name": "Authorization",
                                          "description": "Bearer <token>, or the bare token"}},
            "schemas": {"Envelope": {"type": "object", "required": ["success", "errorCode", "errorMsg", "data"],
                                     "properties": {"success": {"type": "boolean"},
                                                    "errorCode": {"type": "integer"},
                                                    "errorMsg": {"type": "string"}, "data": {"nullable": True}}}},
        },
    }


@routes.get("/api/v2/openapi.json")
@public
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
