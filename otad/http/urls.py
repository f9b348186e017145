"""Absolute URLs handed to devices."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

DOWNLOAD_PATH = "/api/v2/micro/{fileName}"


def download_path(file_name: str) -> str:
    return DOWNLOAD_PATH.format(fileName=quote(file_name))


def download_url(request: web.Request, public_url: str, file_name: str) -> str:
    """The firmware's download URL: on ``public_url`` when configured, else on the host the device
    used to reach us (its Host header), which is by definition reachable from it."""
    base = public_url or f"{request.scheme}://{request.host}"
    return base + download_path(file_name)
