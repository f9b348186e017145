"""Application state keys (aiohttp ``AppKey``s) shared by the route modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from otad.config import Settings
from otad.metrics import Metrics
from otad.service import Services

SERVICES = web.AppKey("services", Services)
SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", Callable[[], Awaitable[dict[str, bool | str]]])
