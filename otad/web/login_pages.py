"""Log in and out of the dashboard."""

from __future__ import annotations

import hmac

from aiohttp import web

from otad.errors import Forbidden, OtadError
from otad.web.keys import DASHBOARD
from otad.web.render import render, see_other
from otad.web.session import (CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, SESSION_MAX_AGE, new_login_token,
                              same_origin, session_action, set_cookie, small_form)

routes = web.RouteTableDef()


def _next(raw: str | None) -> str:
    """Where to go after login: a path on this site only (``//host`` is another site)."""
    if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/"


def _login_form(request: web.Request, status: int = 200, error: OtadError | None = None,
                username: str = "") -> web.Response:
    token = request.cookies.get(LOGIN_COOKIE) or new_login_token()
    response = render(request, "login.html", status=status, error=error, login_token=token, username=username,
                      next=_next(request.rel_url.query.get("next")))
    set_cookie(request, response, LOGIN_COOKIE, token, max_age=3600)
    return response


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return _login_form(request)


@routes.post("/login")
async def log_in(request: web.Request) -> web.StreamResponse:
    try:
        form = await small_form(request)
    except OtadError as error:
        return _login_form(request, error.status, error)
    username = str(form.get("username", ""))
    expected = request.cookies.get(LOGIN_COOKIE, "")
    sent = str(form.get(CSRF_FIELD, "")).encode()
    if not same_origin(request) or not expected or not hmac.compare_digest(sent, expected.encode()):
        return _login_form(request, 403, Forbidden("没有权限: the login form is stale (CSRF); try again"), username)
    try:
        session = await request.app[DASHBOARD].services.admins.log_in(username, str(form.get("password", "")),
                                                                      request.remote)
    except OtadError as error:
        response = _login_form(request, error.status, error, username)
        if retry_after := getattr(error, "retry_after", None):
            response.headers["Retry-After"] = str(retry_after)
        return response
    response = see_other(_next(str(form.get("next", ""))))
    set_cookie(request, response, SESSION_COOKIE, session.secret, max_age=SESSION_MAX_AGE)
    response.del_cookie(LOGIN_COOKIE, path="/")
    return response


@routes.post("/logout")
@session_action
async def log_out(request: web.Request) -> web.StreamResponse:
    await request.app[DASHBOARD].services.admins.log_out(request.cookies.get(SESSION_COOKIE, ""))
    response = see_other("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    return response
