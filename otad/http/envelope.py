"""The response envelope ``{"success","errorCode","errorMsg","data"}`` and the one middleware that
checks the token (default deny) and turns domain errors (and anything unexpected) into it."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import ClientConnectionResetError, hdrs, web
from aiohttp.streams import EofStream

from otad.errors import InvalidInput, NotFound, OtadError, TooLarge, TooManyRequests, UnsupportedEncoding
from otad.http.auth import require_token
from otad.http.keys import SETTINGS

log = logging.getLogger(__name__)

ALWAYS_HTTP_200 = web.AppKey("always_http_200", bool)
# The handlers of the API's routes; other routes of the application (the dashboard's pages) are
# passed through untouched.
API_HANDLERS = web.AppKey("api_handlers", frozenset)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def ok(data: Any = None) -> web.Response:
    body = {"success": True, "errorCode": 200, "errorMsg": "成功", "data": data}
    return web.json_response(body, dumps=_dumps)


def failure(error: OtadError, always_http_200: bool) -> web.Response:
    body = {"success": False, "errorCode": error.code, "errorMsg": error.message, "data": None}
    response = web.json_response(body, status=200 if always_http_200 else error.status, dumps=_dumps)
    if isinstance(error, TooManyRequests):
        response.headers["Retry-After"] = str(error.retry_after)
    return response


# aiohttp's own refusals (no such route, wrong method, body too large) in our envelope.
_HTTP_ERRORS: dict[int, type[OtadError]] = {404: NotFound, 405: InvalidInput, 413: InvalidInput}


@web.middleware
async def envelope_middleware(request: web.Request, handler) -> web.StreamResponse:
    always_200 = request.app[ALWAYS_HTTP_200]
    if request.match_info.http_exception is None and request.match_info.handler not in request.app[API_HANDLERS]:
        return await handler(request)
    try:
        await require_token(request)
        return await handler(request)
    except OtadError as error:
        if error.status >= 500:
            log.error("%s %s failed: %s", request.method, request.path, error.message)
        return failure(error, always_200)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = _HTTP_ERRORS.get(exc.status, InvalidInput)
        error = kind(f"{kind.default_message}: {exc.reason}")
        error.status = exc.status
        return failure(error, always_200)
    except (ConnectionResetError, ClientConnectionResetError, asyncio.IncompleteReadError, EofStream) as exc:
        # The client went away mid-request (an aborted upload): nothing to answer, nothing broken.
        log.info("%s %s: the client closed the connection mid-request (%s)", request.method, request.path,
                 type(exc).__name__)
        return failure(InvalidInput("参数无效: the request ended before its body was complete"), always_200)
    except Exception:
        # The traceback goes to the log; the client gets a short message and no internals.
        log.exception("%s %s failed", request.method, request.path)
        return failure(OtadError("失败: internal error, see the server log"), always_200)


# Request bodies, as sent (compressed ones are refused, so this is also their decoded size): small
# for login, pins and the xiaozhi check, larger only for registering devices in bulk.
SMALL_JSON_BODY = 64 * 1024
MAX_JSON_BODY = 4 * 1024 * 1024


def refuse_encoded_body(request: web.BaseRequest) -> None:
    """No compressed request bodies: inflating them would be the client's choice of our memory
    and CPU (16 KiB of gzip on the wire is 16 MiB of JSON)."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedEncoding()


async def read_body(request: web.Request, limit: int) -> bytes:
    """The raw body, at most ``limit`` bytes (TooLarge past it), all of it within the body timeout:
    these bodies are small, so a sender trickling a byte a minute gets no longer than a slow one."""
    refuse_encoded_body(request)
    too_large = TooLarge(f"参数无效: the request body is over {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    timeout = request.app[SETTINGS].http.body_timeout
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(65536):
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise InvalidInput(f"参数无效: the request body did not arrive within {timeout:g} s") from None
    return bytes(body)


async def read_json(request: web.Request, limit: int = SMALL_JSON_BODY) -> Any:
    body = await read_body(request, limit)
    try:
        return json.loads(body.decode(request.charset or "utf-8"))
    except (ValueError, LookupError, RecursionError):  # bad JSON, unknown charset, absurd nesting
        raise InvalidInput("参数无效: the request body is not valid JSON") from None
