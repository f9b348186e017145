"""The aiohttp application factory: middlewares, state and the route table."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from otad.config import Settings
from otad.http import (admin_routes, campaign_routes, download, openapi, ops_routes, passive_routes,
                       upgrade_routes, xiaozhi_routes)
from otad.http.auth import auth_middleware
from otad.http.envelope import ALWAYS_HTTP_200, envelope_middleware
from otad.http.inflight import InFlight
from otad.http.keys import HEALTH, METRICS, SERVICES, SETTINGS
from otad.http.ops_routes import latency_middleware
from otad.metrics import Metrics
from otad.service import Services

# The access log line carries the request id, as does the reply (X-Request-Id), so a client's
# report can be matched with the server's log.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs "%{User-Agent}i" request_id=%{X-Request-Id}o'


@web.middleware
async def request_id_middleware(request: web.Request, handler) -> web.StreamResponse:
    request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers["X-Request-Id"] = request_id
        raise
    response.headers["X-Request-Id"] = request_id
    return response


def create_app(services: Services, settings: Settings, inflight: InFlight, metrics: Metrics,
               health: Callable[[], Awaitable[dict[str, bool]]]) -> web.Application:
    # Uploads are streamed and limited by the service; client_max_size bounds the JSON bodies only.
    app = web.Application(middlewares=[inflight.middleware, request_id_middleware, latency_middleware,
                                       envelope_middleware, auth_middleware],
                          client_max_size=16 * 1024 * 1024)
    app[SERVICES] = services
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[HEALTH] = health
    app[ALWAYS_HTTP_200] = settings.api.always_http_200
    app.add_routes(admin_routes.routes)
    app.add_routes(download.routes)
    app.add_routes(passive_routes.routes)
    app.add_routes(upgrade_routes.routes)
    app.add_routes(campaign_routes.routes)
    app.add_routes(ops_routes.routes)
    app.add_routes(openapi.routes)
    app.add_routes(xiaozhi_routes.routes)
    return app
