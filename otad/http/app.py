"""The aiohttp application factory: middlewares, state and the route table."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from otad.config import Settings
from otad.http import (admin_routes, campaign_routes, delta_routes, download, hook_routes, openapi, ops_routes,
                       passive_routes, upgrade_routes, xiaozhi_routes)
from otad.http.connections import CONNECTIONS, ConnectionGuard
from otad.http.envelope import ALWAYS_HTTP_200, API_HANDLERS, MAX_JSON_BODY, envelope_middleware
from otad.http.observe import RequestObserver
from otad.http.keys import HEALTH, METRICS, SERVICES, SETTINGS
from otad.metrics import Metrics
from otad.service import Services

# The access log line carries the request id, as does the reply (X-Request-Id), so a client's
# report can be matched with the server's log.
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs "%{User-Agent}i" request_id=%{X-Request-Id}o'


def create_app(services: Services, settings: Settings, observer: RequestObserver, metrics: Metrics,
               health: Callable[[], Awaitable[dict[str, bool | str]]],
               connections: ConnectionGuard | None = None,
               dashboard: Callable[[web.Application], None] | None = None) -> web.Application:
    """The API's application; ``dashboard`` adds the operator pages to it. Those do their own
    login (a session cookie) and show errors as pages: the envelope middleware leaves them be."""
    # Uploads are streamed and limited by the service; JSON bodies are read with a limit per
    # endpoint (envelope.read_json); client_max_size is only the outer bound for anything else.
    app = web.Application(middlewares=[observer.middleware, envelope_middleware],
                          client_max_size=MAX_JSON_BODY)
    if connections is not None:
        app[CONNECTIONS] = connections
    app.on_response_prepare.append(observer.on_response_prepare)
    app[SERVICES] = services
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[HEALTH] = health
    app[passive_routes.POLL_REPLIES] = {}
    app[ALWAYS_HTTP_200] = settings.api.always_http_200
    app.add_routes(admin_routes.routes)
    app.add_routes(download.routes)
    app.add_routes(delta_routes.routes)
    app.add_routes(passive_routes.routes)
    app.add_routes(upgrade_routes.routes)
    app.add_routes(campaign_routes.routes)
    app.add_routes(ops_routes.routes)
    app.add_routes(openapi.routes)
    app.add_routes(xiaozhi_routes.routes)
    if settings.mqtt.provisioning == "http-hooks":  # EMQX asks otad who may connect and publish
        app.add_routes(hook_routes.routes)
    app[API_HANDLERS] = frozenset(route.handler for route in app.router.routes())
    if dashboard is not None:
        dashboard(app)
    return app
