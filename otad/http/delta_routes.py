"""The admin API of delta patches (issue 14, docs/delta.md): build them on demand, list them.
Devices download a patch from the firmware route, like a package (otad.http.download)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from otad.http.keys import SERVICES
from otad.http.views import timestamp
from otad.http.envelope import ok
from otad.model import DeltaRecord
from otad.service.deltas import DeltaOutcome

routes = web.RouteTableDef()

DELTA_PATH = "/api/v2/otaDelta"


def delta_view(patch: DeltaRecord) -> dict[str, Any]:
    return {"id": patch.id, "otaId": patch.package_id, "baseOtaId": patch.base_package_id,
            "base": patch.base_version, "fileName": patch.file_name, "size": patch.size, "md5": patch.md5,
            "sha256": patch.sha256, "compression": patch.compression, "createdAt": timestamp(patch.created_at)}


def outcome_view(outcome: DeltaOutcome) -> dict[str, Any]:
    return {"baseOtaId": outcome.base_package_id, "base": outcome.base_version,
            "patch": delta_view(outcome.patch) if outcome.patch is not None else None, "note": outcome.note}


@routes.post(DELTA_PATH)
async def delta_build(request: web.Request) -> web.Response:
    """Build the patches to package ``id`` now (from ``base``, or the product's latest earlier
    packages); the reply waits for them, the event loop does not (a process builds them)."""
    query = request.rel_url.query
    outcomes = await request.app[SERVICES].deltas.build(query.get("id"), query.get("base"))
    return ok([outcome_view(outcome) for outcome in outcomes])


@routes.get(DELTA_PATH)
async def delta_list(request: web.Request) -> web.Response:
    patches = await request.app[SERVICES].deltas.list(request.rel_url.query.get("id"))
    return ok([delta_view(patch) for patch in patches])
