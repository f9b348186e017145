"""The upgrades: a table filtered by state, campaign and device, paged in SQL, with live states
and a cancel button per open upgrade; one upgrade's page with its timeline."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from aiohttp import web
from yarl import URL

from otad.errors import InvalidInput
from otad.model import OPEN_STATES, UpgradeState
from otad.web.device_pages import device_path
from otad.web.keys import DASHBOARD
from otad.web.paging import pager
from otad.web.render import render, see_other
from otad.web.session import page

routes = web.RouteTableDef()

NOTICES = {"cancelled": "The upgrade is cancelled and its command withdrawn from the device."}
# What the list's filter form and its pager links carry (query name: the service's argument).
FILTERS = {"state": "state", "campaign": "campaign", "device": "device_name", "pageSize": "page_size"}
TIMELINE_PAGE_SIZE = 50


def upgrade_path(version: str) -> str:
    return "/upgrades/" + quote(version, safe="")


def _filters(query: Mapping[str, str]) -> dict[str, str]:
    """The filters set in the query (blank ones are not filters)."""
    return {key: query[key].strip() for key in FILTERS if query.get(key, "").strip()}


@routes.get("/upgrades")
@page
async def upgrades(request: web.Request) -> web.Response:
    query = request.rel_url.query
    filters = _filters(query)
    found = await request.app[DASHBOARD].services.upgrades.list(
        page=query.get("page"), **{FILTERS[key]: value for key, value in filters.items()})
    return render(request, "upgrades.html", notices=NOTICES, found=found, filters=filters, states=list(UpgradeState),
                  pager=pager("/upgrades", filters, found.page, found.page_size, found.total),
                  open_states=OPEN_STATES, back=request.path_qs, device_path=device_path, upgrade_path=upgrade_path)


@routes.get("/upgrades/{version}")
@page
async def upgrade(request: web.Request) -> web.Response:
    service = request.app[DASHBOARD].services.upgrades
    found = await service.get(request.match_info["version"])
    timeline = await service.timeline(found, request.rel_url.query.get("page"), TIMELINE_PAGE_SIZE)
    here = upgrade_path(found.version)
    return render(request, "upgrade.html", notices=NOTICES, upgrade=found, timeline=timeline,
                  pager=pager(here, {}, timeline.page, timeline.page_size, timeline.total),
                  open_states=OPEN_STATES, here=here, device_path=device_path)


def _back(raw: object) -> str:
    """Where to go after cancelling: a page of the upgrades (the list with its filters, or one
    upgrade), never anywhere else; the form says it, so no Referer is needed."""
    if isinstance(raw, str) and (raw == "/upgrades" or raw.startswith(("/upgrades?", "/upgrades/"))) \
            and raw.isprintable() and "\\" not in raw:
        return raw
    raise InvalidInput("参数无效: back must be a page of /upgrades")


@routes.post("/upgrades/{version}/cancel")
@page
async def cancel(request: web.Request) -> web.Response:
    form = await request.post()
    back = _back(form.get("back", "/upgrades"))
    await request.app[DASHBOARD].services.upgrades.cancel(request.match_info["version"])
    return see_other(str(URL(back).update_query(done="cancelled")))
