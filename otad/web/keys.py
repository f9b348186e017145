"""The dashboard's state on the aiohttp application and on each request."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from aiohttp import web

from otad.service import Services


# http.body_timeout's default: how long an upload's body may go without sending a byte.
DEFAULT_BODY_TIMEOUT = 60.0


@dataclass(frozen=True)
class Dashboard:
    services: Services
    templates: jinja2.Environment
    body_timeout: float = DEFAULT_BODY_TIMEOUT


@dataclass(frozen=True)
class Operator:
    """Who is logged in on this request."""

    username: str
    role: str
    csrf: str  # the token every form of this session carries

    @property
    def can_change(self) -> bool:
        return self.role == "admin"


DASHBOARD = web.AppKey("dashboard", Dashboard)
OPERATOR = web.RequestKey("operator", Operator)
