"""The aiohttp application factory: middlewares, state and the route table."""

from __future__ import annotations

from aiohttp import web

from otad.config import Settings
from otad.http import admin_routes, campaign_routes, download, passive_routes, upgrade_routes, xiaozhi_routes
from otad.http.auth import auth_middleware
from otad.http.envelope import ALWAYS_HTTP_200, envelope_middleware
from otad.http.inflight import InFlight
from otad.http.keys import SERVICES, SETTINGS
from otad.service import Services


def create_app(services: Services, settings: Settings, inflight: InFlight) -> web.Application:
    # Uploads are streamed and limited by the service; client_max_size bounds the JSON bodies only.
    app = web.Application(middlewares=[inflight.middleware, envelope_middleware, auth_middleware],
                          client_max_size=16 * 1024 * 1024)
    app[SERVICES] = services
    app[SETTINGS] = settings
    app[ALWAYS_HTTP_200] = settings.api.always_http_200
    app.add_routes(admin_routes.routes)
    app.add_routes(download.routes)
    app.add_routes(passive_routes.routes)
    app.add_routes(upgrade_routes.routes)
    app.add_routes(campaign_routes.routes)
    app.add_routes(xiaozhi_routes.routes)
    return app
