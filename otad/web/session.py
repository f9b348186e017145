"""Dashboard sessions: a login token in an HttpOnly, SameSite=Strict cookie, and a CSRF token
on every form.

The session cookie holds the secret of a login token (the same kind ``POST /api/v2/login``
issues, with its user's role and lifetime), so ``otad user passwd|delete`` and ``otad token
revoke`` end a dashboard session too. Each session's CSRF token is derived from its secret
(HMAC): another site can neither read it nor make one, and there is nothing more to store.
Before login the form carries a random token matched against a cookie of its own.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import BodyPartReader, MultipartReader, web
from multidict import MultiDictProxy

from otad import uploads
from otad.errors import Forbidden, InvalidInput, NotLoggedIn, OtadError, TooLarge
from otad.service.admins import LOGIN_TOKEN_LIFETIME, login_token_user
from otad.service.roles import require_change
from otad.web.keys import DASHBOARD, OPERATOR, Operator
from otad.web.render import render, see_other

log = logging.getLogger(__name__)

SESSION_COOKIE = "otad_session"
LOGIN_COOKIE = "otad_login"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD"})
# Forms are small; uploads are streamed by their own handler and are not read here.
MAX_FORM = 64 * 1024
# The multipart reader of a form whose CSRF token was read from its first part.
FORM_READER = web.RequestKey("multipart_form", MultipartReader)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def csrf_token(secret: str) -> str:
    return hmac.new(secret.encode(), b"otad-dashboard-csrf", hashlib.sha256).hexdigest()


def set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)


def same_origin(request: web.Request) -> bool:
    """A browser names the page a form was sent from; another site's form is refused even before
    its token is checked. (No Origin header: a non-browser client, which has no cookie to abuse.)"""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return origin.split("://", 1)[-1] == request.host


async def form_token(request: web.Request) -> str:
    """The CSRF token the request carries: the header (scripts, uploads) or the form field."""
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    if request.content_type == "multipart/form-data":
        return await _first_part_token(request)
    if request.content_type == "application/x-www-form-urlencoded":
        return str((await small_form(request)).get(CSRF_FIELD, ""))
    return ""


async def small_form(request: web.Request) -> MultiDictProxy:
    """An urlencoded form (login, every button): at most MAX_FORM bytes, with a Content-Length
    (browsers always send one for these), all of it within the body timeout, so a client that
    trickles or streams a body holds neither memory nor a connection for long. Read once; the
    handler's ``request.post()`` gets the same form."""
    if request.content_length is None:
        raise InvalidInput("参数无效: a form needs a Content-Length")
    if request.content_length > MAX_FORM:
        raise TooLarge(f"参数无效: the form is over {MAX_FORM} bytes")
    timeout = request.app[DASHBOARD].body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.post()
    except TimeoutError:
        raise InvalidInput(f"参数无效: the form did not arrive within {timeout:g} s") from None


async def _first_part_token(request: web.Request) -> str:
    """A multipart form is an upload, streamed by its handler and often far over MAX_FORM, so it
    is not read whole here (request.post() would also leave the handler nothing to stream): its
    token must be its first part, the form's first input. The handler reads on from there."""
    timeout = request.app[DASHBOARD].body_timeout
    reader = await uploads.open_multipart(request, timeout)
    request[FORM_READER] = reader
    part = await uploads.next_part(reader, timeout)
    if not isinstance(part, BodyPartReader) or part.name != CSRF_FIELD:
        return ""
    return await uploads.read_field(part, timeout, limit=256)


async def multipart_form(request: web.Request) -> MultipartReader:
    """A dashboard form's multipart body, past its CSRF part when the token came in it."""
    reader = request.get(FORM_READER)
    if reader is None:
        reader = await uploads.open_multipart(request, request.app[DASHBOARD].body_timeout)
    return reader


async def check_csrf(request: web.Request, expected: str) -> None:
    if not same_origin(request) or not hmac.compare_digest((await form_token(request)).encode(), expected.encode()):
        raise Forbidden("没有权限: the form's security token is missing or stale (CSRF); reload the page and try again")


def _login_redirect(request: web.Request) -> web.Response:
    target = request.path_qs if request.method in SAFE_METHODS else "/"
    return see_other(f"/login?next={quote(target, safe='/')}")


async def operator_of(request: web.Request) -> Operator:
    """Who the session cookie belongs to; NotLoggedIn without a live session."""
    secret = request.cookies.get(SESSION_COOKIE, "")
    token = await request.app[DASHBOARD].services.admins.check_secret(secret)
    return Operator(username=login_token_user(token) or token.name, role=token.role, csrf=csrf_token(secret))


def error_page(request: web.Request, error: OtadError) -> web.Response:
    """The error as a page, with a way back to the page the form was on (this site's only)."""
    referer = request.headers.get("Referer", "")
    own = f"{request.scheme}://{request.host}/"
    back = referer[len(own) - 1:] if referer.startswith(own) else "/"
    return render(request, "error.html", status=error.status, error=error, back=back)


def _guarded(handler: Handler, changes_fleet: bool) -> Handler:
    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            request[OPERATOR] = operator = await operator_of(request)
            if request.method not in SAFE_METHODS:
                await check_csrf(request, operator.csrf)
                if changes_fleet:
                    require_change(operator.role)
            return await handler(request)
        except NotLoggedIn:
            return _login_redirect(request)
        except OtadError as error:
            if error.status >= 500:
                log.error("%s %s failed: %s", request.method, request.path, error.message)
            return error_page(request, error)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_page(request, OtadError("失败: internal error, see the server log"))
    return wrapper


def page(handler: Handler) -> Handler:
    """A dashboard page or action: a live session is needed (else the login page), a change
    (any method but GET) needs an admin and the session's CSRF token, and errors are shown as
    a page."""
    return _guarded(handler, changes_fleet=True)


def session_action(handler: Handler) -> Handler:
    """A form that changes the operator's own session, not the fleet (logout): any role, with
    the CSRF token."""
    return _guarded(handler, changes_fleet=False)


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


SESSION_MAX_AGE = int(LOGIN_TOKEN_LIFETIME.total_seconds())
