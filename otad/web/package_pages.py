"""The packages: the list, an upload form (streamed like the API's otaUpload, with a progress bar
when the script runs) and delete with confirmation."""

from __future__ import annotations

from aiohttp import web

from otad import uploads
from otad.web.keys import DASHBOARD
from otad.web.render import render, see_other
from otad.web.session import multipart_form, page

routes = web.RouteTableDef()

NOTICES = {
    "uploaded": "The package is uploaded.",
    "deleted": "The package is deleted; its open upgrades are cancelled.",
}
# The upload form's fields besides the file; the form sends them before it, so the name is
# checked before a byte of firmware is stored.
UPLOAD_FIELDS = ("name", "productId", "version", "description")


@routes.get("/packages")
@page
async def packages(request: web.Request) -> web.Response:
    services = request.app[DASHBOARD].services
    return render(request, "packages.html", notices=NOTICES, packages=await services.packages.list(),
                  max_upload_size=services.packages.max_upload_size)


@routes.post("/packages")
@page
async def upload(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    catalog = dashboard.services.packages
    uploads.refuse_oversized(request, catalog.max_upload_size)
    reader = await multipart_form(request)
    fields, part = await uploads.file_part(reader, dashboard.body_timeout, UPLOAD_FIELDS)
    name, product_id = await catalog.check_new(fields.get("name", "").strip(), fields.get("productId", "").strip())
    await catalog.upload(name=name, product_id=product_id, original_name=part.filename,
                         chunks=uploads.part_chunks(reader, part, dashboard.body_timeout),
                         version=fields.get("version", "").strip(), description=fields.get("description", "").strip())
    return see_other("/packages?done=uploaded")


@routes.post("/packages/{id}/delete")
@page
async def delete(request: web.Request) -> web.Response:
    await request.app[DASHBOARD].services.packages.delete(request.match_info["id"])
    return see_other("/packages?done=deleted")
