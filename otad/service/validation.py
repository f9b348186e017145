"""Checks on client input shared by the use cases. Each raises the domain error that names the field."""

from __future__ import annotations

import re

from otad.errors import InvalidInput, MissingInput, WrongType

# A device name becomes an MQTT topic level and a username: no '/', '+', '#', spaces or control
# characters. Colons are allowed because xiaozhi boards are named by their MAC address.
DEVICE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# xiaozhi boards send their MAC in lower case; a MAC-named device is stored that way so the board
# finds itself whatever case an admin typed.
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
# SQLite integers are signed 64-bit.
_MAX_INT = 2**63 - 1


def is_clean_text(value: str, *, allow_newlines: bool = False) -> bool:
    """Printable, storable text: no control characters and no lone surrogates (which JSON can
    carry but UTF-8, and so SQLite, cannot)."""
    if allow_newlines:
        value = value.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    if not value.isprintable():
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def safe_text(value: str, limit: int) -> str:
    """Untrusted text we keep anyway (a file name, what a board reports): made storable."""
    cleaned = "".join(c if c.isprintable() else "_" for c in value.encode("utf-8", "replace").decode("utf-8"))
    return cleaned[:limit]


def parse_int(raw: object, field: str) -> int:
    """A non-negative integer from JSON or a query string (digit strings are accepted)."""
    if raw is None or raw == "":
        raise MissingInput(f"参数缺失: {field}")
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and re.fullmatch(r"-?[0-9]{1,19}", raw.strip()):
        value = int(raw)
    else:
        raise WrongType(f"参数类型错误: {field} must be an integer")
    if not 0 <= value <= _MAX_INT:
        raise InvalidInput(f"参数无效: {field} must be between 0 and {_MAX_INT}")
    return value


def check_device_name(raw: object) -> str:
    if raw is None or raw == "":
        raise MissingInput("参数缺失: deviceName")
    if not isinstance(raw, str) or not DEVICE_NAME.fullmatch(raw):
        raise InvalidInput("参数无效: deviceName must be 1-64 characters of letters, digits and _ . : -")
    return raw.lower() if _MAC.fullmatch(raw) else raw


def check_package_name(raw: object) -> str:
    if raw is None or raw == "":
        raise MissingInput("参数缺失: name")
    if not isinstance(raw, str) or len(raw) > 255 or not is_clean_text(raw) or raw != raw.strip():
        raise InvalidInput("参数无效: name must be 1-255 printable characters without surrounding spaces")
    return raw


def optional_text(raw: object, field: str, limit: int) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise WrongType(f"参数类型错误: {field} must be a string")
    if len(raw) > limit:
        raise InvalidInput(f"参数无效: {field} is longer than {limit} characters")
    if not is_clean_text(raw, allow_newlines=True):
        raise InvalidInput(f"参数无效: {field} holds control characters or invalid Unicode")
    return raw


def required_text(raw: object, field: str, limit: int) -> str:
    value = optional_text(raw, field, limit)
    if value is None:
        raise MissingInput(f"参数缺失: {field}")
    return value
