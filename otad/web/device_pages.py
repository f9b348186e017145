"""The devices: a searchable, filterable, paginated table with the xiaozhi boards waiting for
activation; one device's page (inventory, open upgrade, upgrade history with each timeline) and
what an admin does to it (enable a package, pin a passive package, delete)."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from aiohttp import web

from otad.service.fleet import UNKNOWN_VERSION
from otad.web.keys import DASHBOARD, OPERATOR
from otad.web.paging import pager
from otad.web.render import render, see_other
from otad.web.session import page

routes = web.RouteTableDef()

NOTICES = {
    "activated": "The board is activated: it is a device now and gets its firmware with its next check.",
    "deleted": "The device is deleted.",
    "enabled": "The upgrade is enabled and sent to the device.",
    "pinned": "The passive package is pinned: the device gets it with its next poll.",
}
HISTORY_PAGE_SIZE = 20


def device_path(name: str) -> str:
    return "/devices/" + quote(name, safe=":")


def _version_filter(query: Mapping[str, str]) -> str | None:
    """The firmware version asked for: None for any, UNKNOWN_VERSION for never reported
    (``unreported=1``: the form's checkbox and the overview chart's link)."""
    if query.get("unreported") == "1":
        return UNKNOWN_VERSION
    version = (query.get("version") or "").strip()
    return version or None


def _filters(query: Mapping[str, str], version: str | None) -> dict[str, str]:
    """The filters as the form and the pager links carry them (only those set)."""
    filters = {"q": query.get("q", "").strip(), "product": query.get("product", ""),
               "online": query.get("online", "") if query.get("online") != "any" else "",
               "version": version or "", "unreported": "1" if version == UNKNOWN_VERSION else ""}
    if "pageSize" in query:
        filters["pageSize"] = query["pageSize"]
    return {key: value for key, value in filters.items() if value}


@routes.get("/devices")
@page
async def devices(request: web.Request) -> web.Response:
    services = request.app[DASHBOARD].services
    query = request.rel_url.query
    version = _version_filter(query)
    found = await services.fleet.devices(text=query.get("q"), product_id=query.get("product"),
                                         online=query.get("online"), version=version, page=query.get("page"),
                                         page_size=query.get("pageSize"))
    filters = _filters(query, version)
    products = await services.fleet.product_ids()
    return render(request, "devices.html", notices=NOTICES, found=found, filters=filters, products=products,
                  pager=pager("/devices", filters, found.page, found.page_size, found.total),
                  pending=await services.xiaozhi.pending(), device_path=device_path)


@routes.post("/devices/activate")
@page
async def activate(request: web.Request) -> web.Response:
    form = await request.post()
    await request.app[DASHBOARD].services.xiaozhi.accept(form.get("code"))
    return see_other("/devices?done=activated")


@routes.get("/devices/{name}")
@page
async def device(request: web.Request) -> web.Response:
    services = request.app[DASHBOARD].services
    found = await services.fleet.device(request.match_info["name"])
    history = await services.upgrades.list(device_name=found.name, page=request.rel_url.query.get("page"),
                                           page_size=HISTORY_PAGE_SIZE)
    # The timelines of the page's upgrades (20 at most) are read in one query (store.fleet.upgrade_timelines).
    timelines = await services.fleet.timelines(history.items)
    packages = []
    if request[OPERATOR].can_change:  # the choice is only shown beside the forms an admin sees
        packages = [package for package in await services.packages.list() if package.product_id == found.product_id]
    here = device_path(found.name)
    return render(request, "device.html", notices=NOTICES, device=found, history=history, timelines=timelines,
                  open_upgrade=await services.upgrades.open_upgrade_of(found.name), packages=packages,
                  pin=await services.fleet.passive_pin_of(found.name), here=here,
                  pager=pager(here, {}, history.page, history.page_size, history.total))


@routes.post("/devices/{name}/enable")
@page
async def enable(request: web.Request) -> web.Response:
    form = await request.post()
    upgrade = await request.app[DASHBOARD].services.upgrades.enable(form.get("package"), request.match_info["name"],
                                                                    form.get("timeout"))
    return see_other(device_path(upgrade.device_name) + "?done=enabled")


@routes.post("/devices/{name}/pin")
@page
async def pin(request: web.Request) -> web.Response:
    form = await request.post()
    saved = await request.app[DASHBOARD].services.passive.pin({
        "deviceName": request.match_info["name"], "name": form.get("package"),
        "versionName": form.get("versionName"), "description": form.get("description") or None})
    return see_other(device_path(saved.device_name) + "?done=pinned")


@routes.post("/devices/{name}/delete")
@page
async def delete(request: web.Request) -> web.Response:
    await request.app[DASHBOARD].services.devices.delete(request.match_info["name"])
    return see_other("/devices?done=deleted")
