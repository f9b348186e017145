"""Operations: health for systemd and load balancers, Prometheus metrics."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from otad.http.auth import public
from otad.http.keys import HEALTH, METRICS, SERVICES

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


@routes.get("/healthz")
@public
async def healthz(request: web.Request) -> web.Response:
    """200 when the broker serves and the database and the firmware store take writes, else 503
    with the reason for each failing part (no envelope: for probes)."""
    checks = await request.app[HEALTH]()
    healthy = all(value is True for value in checks.values())
    return web.json_response({"status": "ok" if healthy else "failing", **checks}, status=200 if healthy else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    services, registry = request.app[SERVICES], request.app[METRICS]
    registry.upgrades.clear()
    for state, count in (await services.upgrades.counts_by_state()).items():
        registry.upgrades.labels(state).set(count)
    registry.campaign_devices.clear()
    for campaign in await services.campaigns.list():
        if campaign.state in ("running", "paused"):
            for state, count in (await services.upgrades.counts_by_state(campaign.id)).items():
                registry.campaign_devices.labels(str(campaign.id), state).set(count)
    body = generate_latest(registry.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
