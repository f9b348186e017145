"""The admin API: login, packages, devices, push upgrades."""

from __future__ import annotations

from aiohttp import web

from otad import uploads
from otad.errors import InvalidInput
from otad.http.auth import public
from otad.http.envelope import MAX_JSON_BODY, ok, read_json
from otad.http.keys import SERVICES, SETTINGS
from otad.http.views import device_view, enabled_view, new_device_view, package_view

routes = web.RouteTableDef()


@routes.post("/api/v2/login")
@public
async def login(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput('参数无效: expected {"username", "password"}')
    return ok(await request.app[SERVICES].admins.login(body.get("username"), body.get("password"), request.remote))


@routes.post("/api/v2/otaUpload")
async def ota_upload(request: web.Request) -> web.Response:
    packages = request.app[SERVICES].packages
    query = request.rel_url.query
    name, product_id = await packages.check_new(query.get("name"), query.get("productId"))
    uploads.refuse_oversized(request, packages.max_upload_size)
    idle_timeout = request.app[SETTINGS].http.body_timeout
    reader = await uploads.open_multipart(request, idle_timeout)
    _, part = await uploads.file_part(reader, idle_timeout)
    package = await packages.upload(
        name=name, product_id=product_id, original_name=part.filename,
        chunks=uploads.part_chunks(reader, part, idle_timeout),
        version=query.get("version"), description=query.get("description"),
    )
    return ok(package_view(package))


@routes.get("/api/v2/otaList")
async def ota_list(request: web.Request) -> web.Response:
    return ok([package_view(package) for package in await request.app[SERVICES].packages.list()])


@routes.delete("/api/v2/otaDelete")
async def ota_delete(request: web.Request) -> web.Response:
    await request.app[SERVICES].packages.delete(request.rel_url.query.get("id"))
    return ok()


@routes.post("/api/v2/otaEnable")
async def ota_enable(request: web.Request) -> web.Response:
    query = request.rel_url.query
    upgrade = await request.app[SERVICES].upgrades.enable(query.get("name"), query.get("deviceName"),
                                                          query.get("timeout"))
    return ok([enabled_view(upgrade.package, upgrade.version)])


@routes.post("/api/v2/devices")
async def devices_add(request: web.Request) -> web.Response:
    body = await read_json(request, MAX_JSON_BODY)  # up to 10,000 devices at once
    added = await request.app[SERVICES].devices.add(body)
    views = [new_device_view(device) for device in added]
    return ok(views if isinstance(body, list) else views[0])


@routes.get("/api/v2/devices")
async def devices_list(request: web.Request) -> web.Response:
    return ok([device_view(device) for device in await request.app[SERVICES].devices.list()])


@routes.delete("/api/v2/devices")
async def devices_delete(request: web.Request) -> web.Response:
    await request.app[SERVICES].devices.delete(request.rel_url.query.get("deviceName"))
    return ok()
