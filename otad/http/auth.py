"""Default-deny admin auth: every route needs a token unless its handler is marked ``@public``."""

from __future__ import annotations

from aiohttp import web

from otad.http.keys import SERVICES

_PUBLIC = "__otad_public__"


def public(handler):
    """Mark a handler as reachable without a token (device endpoints and login)."""
    setattr(handler, _PUBLIC, True)
    return handler


# What a viewer may call: reading never changes anything. Every other method needs an admin.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


async def require_token(request: web.Request) -> None:
    """Raise NotLoggedIn unless the route is public or the request carries a valid token, and
    Forbidden when a viewer's token asks for a change. Called by the envelope middleware, so an
    auth failure is answered in the envelope like any other."""
    if request.match_info.http_exception is None and not getattr(request.match_info.handler, _PUBLIC, False):
        await request.app[SERVICES].admins.check_authorization(request.headers.get("Authorization"),
                                                               change=request.method not in SAFE_METHODS)
