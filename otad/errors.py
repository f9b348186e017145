"""Domain errors.

Each error carries the stable code of the original platform's envelope (protocol.md section 2) and
the HTTP status that fits it. Services raise these; exactly one place (``otad.http.envelope``) turns
them into a reply, so a code or a status is never chosen in a handler.
"""

from __future__ import annotations


class OtadError(Exception):
    """Base of every error a client may see. ``message`` is safe to show to a client."""

    code = 999
    status = 500
    default_message = "失败"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


class InvalidInput(OtadError):
    """A parameter has a bad value (1001 参数无效)."""

    code = 1001
    status = 400
    default_message = "参数无效"


class WrongType(OtadError):
    """A parameter has the wrong type, e.g. a non-integer product id (1003 参数类型错误)."""

    code = 1003
    status = 400
    default_message = "参数类型错误"


class MissingInput(OtadError):
    """A required parameter, or the upload itself, is missing or empty (1004 参数缺失)."""

    code = 1004
    status = 400
    default_message = "参数缺失"


class NotFound(InvalidInput):
    """The thing named does not exist. The original answers 1001 for this; we add HTTP 404."""

    status = 404


class Conflict(InvalidInput):
    """The request clashes with what exists, e.g. a duplicate package name (1001, HTTP 409)."""

    status = 409


class TooLarge(InvalidInput):
    """The upload is over the configured size limit (1001, HTTP 413)."""

    status = 413


class NotLoggedIn(OtadError):
    """No token, or a bad or expired one (2001 用户未登录)."""

    code = 2001
    status = 401
    default_message = "用户未登录"


class WrongPassword(OtadError):
    """Login with a bad password (2003 密码错误)."""

    code = 2003
    status = 401
    default_message = "密码错误"


class NoSuchAccount(OtadError):
    """Login for an unknown user (2007 账号不存在)."""

    code = 2007
    status = 401
    default_message = "账号不存在"


class Forbidden(OtadError):
    """Authenticated but not allowed (3001 没有权限)."""

    code = 3001
    status = 403
    default_message = "没有权限"


class StillReferenced(OtadError):
    """Deleting something that others still depend on (3002 存在依赖关系，无法删除)."""

    code = 3002
    status = 409
    default_message = "存在依赖关系，无法删除"


class TooManyRequests(OtadError):
    """Too many failed attempts from one address or for one account (999, HTTP 429). The reply
    says when to try again (``retry_after`` seconds, sent as Retry-After)."""

    code = 999
    status = 429
    default_message = "失败: too many attempts; try again later"

    def __init__(self, message: str | None = None, retry_after: int = 60) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnsupportedEncoding(OtadError):
    """A compressed (or otherwise encoded) request body where none is accepted (1001, HTTP 415)."""

    code = 1001
    status = 415
    default_message = "参数无效: Content-Encoding is not accepted here; send the body uncompressed"


class StorageUnavailable(OtadError):
    """A write failed for a reason that passes, such as a busy database (HTTP 503). Nothing was
    written; the same request may succeed later."""

    code = 999
    status = 503
    default_message = "失败: storage is unavailable"


class StorageFull(StorageUnavailable):
    """The database or the firmware store has no space left (HTTP 507 Insufficient Storage)."""

    status = 507
    default_message = "失败: no space left on the device"


class StartupError(Exception):
    """The daemon cannot start (port in use, unwritable data dir, bad config).

    The CLI prints ``str(error)`` as one line on stderr and exits non-zero.
    """
