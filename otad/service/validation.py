"""Checks on client input shared by the use cases. Each raises the domain error that names the field."""

from __future__ import annotations

import re

from otad.errors import InvalidInput, MissingInput, WrongType

# A device name becomes an MQTT topic level and a username: no '/', '+', '#', spaces or control
# characters. Colons are allowed because xiaozhi boards are named by their MAC address.
DEVICE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def parse_int(raw: object, field: str) -> int:
    """A non-negative integer from JSON or a query string (digit strings are accepted)."""
    if raw is None or raw == "":
        raise MissingInput(f"参数缺失: {field}")
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and re.fullmatch(r"-?\d{1,18}", raw.strip()):
        value = int(raw)
    else:
        raise WrongType(f"参数类型错误: {field} must be an integer")
    if value < 0:
        raise InvalidInput(f"参数无效: {field} must not be negative")
    return value


def check_device_name(raw: object) -> str:
    if raw is None or raw == "":
        raise MissingInput("参数缺失: deviceName")
    if not isinstance(raw, str) or not DEVICE_NAME.fullmatch(raw):
        raise InvalidInput("参数无效: deviceName must be 1-64 characters of letters, digits and _ . : -")
    return raw


def check_package_name(raw: object) -> str:
    if raw is None or raw == "":
        raise MissingInput("参数缺失: name")
    if not isinstance(raw, str) or len(raw) > 255 or not raw.isprintable() or raw != raw.strip():
        raise InvalidInput("参数无效: name must be 1-255 printable characters without surrounding spaces")
    return raw


def optional_text(raw: object, field: str, limit: int) -> str | None:
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise WrongType(f"参数类型错误: {field} must be a string")
    if len(raw) > limit:
        raise InvalidInput(f"参数无效: {field} is longer than {limit} characters")
    return raw


def required_text(raw: object, field: str, limit: int) -> str:
    value = optional_text(raw, field, limit)
    if value is None:
        raise MissingInput(f"参数缺失: {field}")
    return value
