"""The dashboard's own stylesheet and script, served by otad (no CDN: gateways are often offline).

Everything under ``static/`` is ours (Apache-2.0, like otad); no third-party asset is vendored.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "static"

routes = web.RouteTableDef()
routes.static("/static", STATIC, append_version=False)
