"""The response envelope ``{"success","errorCode","errorMsg","data"}`` and the one middleware that
checks the token (default deny) and turns domain errors (and anything unexpected) into it."""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from otad.errors import InvalidInput, NotFound, OtadError, TooManyRequests
from otad.http.auth import require_token

log = logging.getLogger(__name__)

ALWAYS_HTTP_200 = web.AppKey("always_http_200", bool)


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
    except Exception:
        # The traceback goes to the log; the client gets a short message and no internals.
        log.exception("%s %s failed", request.method, request.path)
        return failure(OtadError("失败: internal error, see the server log"), always_200)


async def read_json(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, LookupError, RecursionError):  # bad JSON, unknown charset, absurd nesting
        raise InvalidInput("参数无效: the request body is not valid JSON") from None
