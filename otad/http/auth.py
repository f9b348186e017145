"""Default-deny admin auth: every route needs a token unless its handler is marked ``@public``."""

from __future__ import annotations

from aiohttp import web

from otad.http.keys import SERVICES

_PUBLIC = "__otad_public__"


def public(handler):
    """Mark a handler as reachable without a token (device endpoints and login)."""
    setattr(handler, _PUBLIC, True)
    return handler


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    route_handler = request.match_info.handler
    if request.match_info.http_exception is None and not getattr(route_handler, _PUBLIC, False):
        await request.app[SERVICES].admins.check_authorization(request.headers.get("Authorization"))
    return await handler(request)
