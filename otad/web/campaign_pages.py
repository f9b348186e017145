"""The campaigns (staged rollouts): the list, a create form that builds the API's body, and a
campaign's live view per stage with pause, resume and cancel."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

from otad.errors import InvalidInput, OtadError
from otad.service import PackageRecord
from otad.service.campaigns import FAILED, CampaignStatus
from otad.model import OPEN_STATES, UpgradeState
from otad.web.keys import DASHBOARD
from otad.web.render import render, see_other
from otad.web.session import page

routes = web.RouteTableDef()

NOTICES = {
    "created": "The campaign is created: its first stage starts now.",
    "paused": "The campaign is paused: no new device is told; upgrades under way go on.",
    "resumed": "The campaign runs again. Failures so far are accepted: only new ones count against the threshold.",
    "cancelled": "The campaign is cancelled, and its open upgrades with it.",
}
ACTIONS = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}
# What the create form shows before anything is typed: the API's defaults (timeout: the daemon's).
FORM_DEFAULTS = {"package": "", "stages": "1, 10, 50, 100", "successThreshold": "0.95", "failureThreshold": "0.05",
                 "maxConcurrent": "100", "notifyRate": "10", "timeout": ""}
NUMBER_FIELDS = ("successThreshold", "failureThreshold", "maxConcurrent", "notifyRate", "timeout")
ENDED_OTHERWISE = (UpgradeState.CANCELLED, UpgradeState.SUPERSEDED)


@dataclass(frozen=True)
class StageRow:
    """One stage as the page shows it."""

    number: int  # 1-based
    percent: int  # cumulative share of the product's devices
    share: int  # this stage's own share
    devices: int
    states: Counter

    def count(self, states: Iterable[str]) -> int:
        return sum(self.states[state] for state in states)

    @property
    def failed(self) -> int:
        return self.count(FAILED)

    @property
    def ended(self) -> int:  # ended with an outcome: what the success rate is taken over
        return self.states[UpgradeState.UPDATED] + self.failed

    @property
    def unstarted(self) -> int:
        return max(0, self.devices - sum(self.states.values()))


@dataclass(frozen=True)
class Standing:
    """The open stages against the thresholds, counted as the engine counts them: failures over
    the devices of the open stages (less those accepted on resume), success over those that ended."""

    opened: int
    failed: int
    updated: int

    @property
    def ended(self) -> int:
        return self.failed + self.updated


def _stage_rows(status: CampaignStatus) -> list[StageRow]:
    rows, previous = [], 0
    for index, percent in enumerate(status.campaign.stages):
        rows.append(StageRow(index + 1, percent, percent - previous, status.devices_per_stage[index],
                             status.by_stage.get(index, Counter())))
        previous = percent
    return rows


def _standing(status: CampaignStatus, rows: list[StageRow]) -> Standing:
    open_rows = rows[:status.campaign.current_stage + 1]
    failed = max(0, sum(row.failed for row in open_rows) - status.campaign.failures_accepted)
    return Standing(opened=sum(row.devices for row in open_rows), failed=failed,
                    updated=sum(row.states[UpgradeState.UPDATED] for row in open_rows))


def _fraction(value: float) -> str:
    return f"{value * 100:g}%"


@routes.get("/campaigns")
@page
async def campaigns(request: web.Request) -> web.Response:
    return await _list_page(request, FORM_DEFAULTS)


async def _list_page(request: web.Request, form: dict[str, str], error: OtadError | None = None) -> web.Response:
    services = request.app[DASHBOARD].services
    return render(request, "campaigns.html", status=error.status if error else 200, notices=NOTICES,
                  campaigns=await services.campaigns.list(), packages=await services.packages.list(), form=form,
                  error=error)


def _typed(text: str) -> object:
    """A number as JSON would carry it; anything else as typed, for the service to refuse with
    its own message (the form and the API say the same)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _body(form: dict[str, str], packages: list[PackageRecord]) -> dict[str, object]:
    """The API's body (``POST /api/v2/campaigns``) from the form; empty fields take its defaults."""
    package = next((p for p in packages if str(p.id) == form["package"]), None)
    if package is None:
        raise InvalidInput("参数无效: choose the package to roll out")
    stages = [_typed(token.rstrip("%")) for token in re.split(r"[,;\s]+", form["stages"]) if token]
    body: dict[str, object] = {"name": package.name, "productId": package.product_id, "stages": stages}
    for name in NUMBER_FIELDS:
        if form[name]:
            body[name] = _typed(form[name])
    return body


@routes.post("/campaigns")
@page
async def create(request: web.Request) -> web.Response:
    services = request.app[DASHBOARD].services
    posted = await request.post()
    form = {name: str(posted.get(name, "")).strip()[:200] for name in FORM_DEFAULTS}
    try:
        campaign = await services.campaigns.create(_body(form, await services.packages.list()))
    except OtadError as error:
        if error.status >= 500:
            raise
        return await _list_page(request, form, error)  # the form again, as typed, with the reason
    return see_other(f"/campaigns/{campaign.id}?done=created")


@routes.get("/campaigns/{id}")
@page
async def campaign(request: web.Request) -> web.Response:
    status = await request.app[DASHBOARD].services.campaigns.status(request.match_info["id"])
    rows = _stage_rows(status)
    return render(request, "campaign.html", notices=NOTICES, view=status, stages=rows,
                  standing=_standing(status, rows), total=sum(row.devices for row in rows),
                  states=list(UpgradeState), open_states=[str(state) for state in OPEN_STATES],
                  failed_states=[str(state) for state in FAILED],
                  other_states=[str(state) for state in ENDED_OTHERWISE], fraction=_fraction)


@routes.post("/campaigns/{id}/{action:pause|resume|cancel}")
@page
async def act(request: web.Request) -> web.Response:
    service = request.app[DASHBOARD].services.campaigns
    action = request.match_info["action"]
    campaign = await getattr(service, action)(request.match_info["id"])
    return see_other(f"/campaigns/{campaign.id}?done={ACTIONS[action]}")
