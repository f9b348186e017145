"""The endpoints EMQX 5's HTTP authenticator and HTTP authorizer call (mqtt.provisioning =
http-hooks): devices log in to EMQX with their otad password, and may use only their own topics.

These are called by the broker, not by people: no token, but a shared secret in a header
(``mqtt.hook_secret``), or, with none configured, calls from this machine only. Answers are
EMQX's: HTTP 200 with ``{"result": "allow"|"deny"}`` (and ``is_superuser`` for logins); a 4xx
(a bad or unauthorised call) is taken by EMQX as "ignore", which with the configuration of
docs/emqx.md ends in a refusal.
"""

from __future__ import annotations

import hmac
import logging
from urllib.parse import unquote, urlsplit

from aiohttp import web

from otad.errors import Forbidden, InvalidInput
from otad.http.auth import public
from otad.http.envelope import SMALL_JSON_BODY, read_json
from otad.http.keys import SERVICES, SETTINGS
from otad.topics import is_own_topic, is_server_only

log = logging.getLogger(__name__)

AUTH_PATH = "/api/v2/emqx/auth"
ACL_PATH = "/api/v2/emqx/acl"
SECRET_HEADER = "X-Otad-Hook-Secret"
_LOCAL_CALLERS = ("127.0.0.1", "::1")

routes = web.RouteTableDef()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


async def _hook_call(request: web.Request) -> dict[str, str]:
    """The call's fields (strings; anything else reads as empty), once the caller is the broker."""
    secret = request.app[SETTINGS].mqtt.hook_secret
    if secret:
        if not _same(request.headers.get(SECRET_HEADER, ""), secret):
            raise Forbidden(f"没有权限: EMQX hook call without the right {SECRET_HEADER} header")
    elif request.remote not in _LOCAL_CALLERS:
        raise Forbidden("没有权限: with no mqtt.hook_secret set the EMQX hooks answer 127.0.0.1 only")
    body = await read_json(request, SMALL_JSON_BODY)
    if not isinstance(body, dict):
        raise InvalidInput("参数无效: the body must be a JSON object")
    return {name: value if isinstance(value, str) else "" for name, value in body.items()}


def _otad_account(request: web.Request) -> tuple[str, str]:
    """otad's own user and password on the broker (mqtt.external_url), as EMQX receives them."""
    parts = urlsplit(request.app[SETTINGS].mqtt.external_url)
    return unquote(parts.username or ""), unquote(parts.password or "")


def _answer(allowed: bool, **extra) -> web.Response:
    return web.json_response({"result": "allow" if allowed else "deny", **extra})


@routes.post(AUTH_PATH)
@public  # the broker has no token; _hook_call checks the shared secret instead
async def emqx_auth(request: web.Request) -> web.Response:
    """EMQX's authenticator: a device with its otad password, or otad's own account."""
    call = await _hook_call(request)
    username, password = call.get("username", ""), call.get("password", "")
    own_user, own_password = _otad_account(request)
    if own_user and _same(username, own_user):
        allowed = bool(own_password) and _same(password, own_password)
    else:
        allowed = await request.app[SERVICES].devices.check_mqtt_login(username, password)
    if not allowed:
        log.info("EMQX login refused for %r (client id %r)", username, call.get("clientid", ""))
    # Never a superuser: otad's own account is let through by the authorizer below, so every
    # client's publishes and subscriptions still pass one place.
    return _answer(allowed, is_superuser=False)


@routes.post(ACL_PATH)
@public
async def emqx_acl(request: web.Request) -> web.Response:
    """EMQX's authorizer: otad's own account may do anything; a device only its own topics, and
    it may not publish on the ones only otad publishes on (its command, the replies to it, its chunks)."""
    call = await _hook_call(request)
    username, topic, action = call.get("username", ""), call.get("topic", ""), call.get("action", "")
    own_user, _ = _otad_account(request)
    if own_user and _same(username, own_user):
        return _answer(True)
    if not username or not topic or not is_own_topic(username, topic):
        return _answer(False)
    if not await request.app[SERVICES].devices.is_registered(username):
        return _answer(False)  # deleted while connected: EMQX keeps the session, not its topics
    if action == "subscribe":
        return _answer(True)
    if action == "publish":
        return _answer(not is_server_only(username, topic))
    return _answer(False)  # an action this rule does not know
