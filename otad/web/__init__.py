"""The operator dashboard: server-rendered pages with a little JavaScript, served by otad's own
HTTP server at ``/`` beside the API (which stays under ``/api/v2/``).

Its pages log in with a session cookie instead of a token, answer errors as pages instead of the
JSON envelope, and take every asset from otad itself (``static/``): a gateway often has no internet.
"""

from __future__ import annotations

from aiohttp import web

from otad.service import Services
from otad.web import assets, campaign_pages, device_pages, live, login_pages, overview_pages, package_pages, upgrade_pages
from otad.web.keys import DASHBOARD, DEFAULT_BODY_TIMEOUT, Dashboard
from otad.web.render import templates

__all__ = ["install"]


def install(app: web.Application, services: Services, body_timeout: float = DEFAULT_BODY_TIMEOUT) -> None:
    """Add the dashboard's routes and state to ``app``; ``body_timeout``: http.body_timeout, for
    the package upload form."""
    app[DASHBOARD] = Dashboard(services=services, templates=templates(), body_timeout=body_timeout)
    for module in (login_pages, overview_pages, package_pages, device_pages, upgrade_pages, campaign_pages, live,
                   assets):
        app.add_routes(module.routes)
