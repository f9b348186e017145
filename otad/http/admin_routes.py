"""The admin API: login, packages, devices, push upgrades."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from otad.errors import InvalidInput, MissingInput, TooLarge
from otad.http.auth import public
from otad.http.envelope import MAX_JSON_BODY, ok, read_json, refuse_encoded_body
from otad.http.keys import SERVICES, SETTINGS
from otad.http.views import device_view, enabled_view, new_device_view, package_view

routes = web.RouteTableDef()

_CHUNK = 1024 * 1024
# Multipart framing around the file: a little over the limit is still a legal upload.
_MULTIPART_SLACK = 64 * 1024


@routes.post("/api/v2/login")
@public
async def login(request: web.Request) -> web.Response:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidInput('参数无效: expected {"username", "password"}')
    return ok(await request.app[SERVICES].admins.login(body.get("username"), body.get("password"), request.remote))


async def _part_chunks(reader: MultipartReader, part: BodyPartReader, idle_timeout: float) -> AsyncIterator[bytes]:
    """The file's bytes, then the rest of the form checked. A body cut off before the closing
    boundary is an error, not a shorter firmware: aiohttp's reader simply stops, and the stored
    image would be truncated. A body that sends nothing for ``idle_timeout`` is refused, and so
    is a second ``file`` part (which one would be the firmware?). Raised here, each leaves
    nothing stored."""
    try:
        while True:
            async with asyncio.timeout(idle_timeout):
                chunk = await part.read_chunk(_CHUNK)
            if not chunk:
                break
            yield chunk
        if not part.at_eof():
            raise InvalidInput("参数无效: the upload ended before the multipart closing boundary")
        while True:
            async with asyncio.timeout(idle_timeout):
                extra = await reader.next()
                if extra is None:
                    break
                if isinstance(extra, BodyPartReader) and extra.name == "file":
                    raise InvalidInput("参数无效: more than one 'file' part; send one firmware per upload")
                await extra.release()
    except TimeoutError:
        raise InvalidInput(f"参数无效: the upload sent nothing for {idle_timeout:g} s") from None
    except (ValueError, HttpProcessingError) as exc:  # aiohttp: "Reading after EOF" and other framing errors
        raise InvalidInput(f"参数无效: malformed multipart body: {exc}") from None


async def _file_part(request: web.Request) -> tuple[MultipartReader, BodyPartReader]:
    if not request.content_type.startswith("multipart/"):
        raise MissingInput("参数缺失: send the firmware as multipart form field 'file'")
    refuse_encoded_body(request)
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name == "file":
                return reader, part
            await part.release()
    except (ValueError, HttpProcessingError) as exc:  # aiohttp's reports of malformed framing or headers
        raise InvalidInput(f"参数无效: malformed multipart body: {exc}") from None
    raise MissingInput("参数缺失: multipart form field 'file'")


@routes.post("/api/v2/otaUpload")
async def ota_upload(request: web.Request) -> web.Response:
    packages = request.app[SERVICES].packages
    query = request.rel_url.query
    name, product_id = await packages.check_new(query.get("name"), query.get("productId"))
    if request.content_length is not None and request.content_length > packages.max_upload_size + _MULTIPART_SLACK:
        raise TooLarge(f"文件过大: the upload exceeds the limit of {packages.max_upload_size} bytes")
    reader, part = await _file_part(request)
    package = await packages.upload(
        name=name, product_id=product_id, original_name=part.filename,
        chunks=_part_chunks(reader, part, request.app[SETTINGS].http.body_timeout),
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
