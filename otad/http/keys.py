"""Application state keys (aiohttp ``AppKey``s) shared by the route modules."""

from __future__ import annotations

from aiohttp import web

from otad.config import Settings
from otad.service import Services

SERVICES = web.AppKey("services", Services)
SETTINGS = web.AppKey("settings", Settings)
