"""Firmware download for devices: exact bytes, Content-Length, resumable with Range."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from urllib.parse import quote

from aiohttp import hdrs, web
from multidict import CIMultiDict

from otad.http.auth import public
from otad.http.keys import METRICS, SERVICES
from otad.http.urls import DOWNLOAD_PATH

routes = web.RouteTableDef()


def _etag_of(stat: os.stat_result) -> str:
    # The same value aiohttp's FileResponse puts in ETag, so If-Range compares like with like.
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


class FirmwareResponse(web.FileResponse):
    """``FileResponse`` that serves the stored bytes only and honours an ETag in If-Range."""

    def __init__(self, path: Path, download_name: str, on_sent=None) -> None:
        super().__init__(path, headers={hdrs.CONTENT_DISPOSITION: _disposition(download_name)})
        self._on_sent = on_sent

    def _get_file_path_stat_encoding(self, accept_encoding: str):
        # Never substitute a ".gz"/".br" sibling: firmware must be the exact uploaded bytes.
        return super()._get_file_path_stat_encoding("")

    async def prepare(self, request: web.BaseRequest):
        writer = await super().prepare(await _without_stale_range(request, self._path))
        if self._on_sent is not None and request.method == "GET" and self.status in (200, 206):
            self._on_sent(self.content_length or 0)
        return writer


async def _without_stale_range(request: web.BaseRequest, path: Path) -> web.BaseRequest:
    """aiohttp compares If-Range only as a date and serves a stale range when it holds an ETag
    (stack-notes). A range is only valid for the representation the client started with, so unless
    If-Range names our current ETag, or is a date (which aiohttp checks), we drop Range and send the
    whole file with 200 (RFC 9110 section 13.1.5)."""
    if_range = request.headers.get(hdrs.IF_RANGE)
    if hdrs.RANGE not in request.headers or if_range is None:
        return request
    if request.if_range is not None:
        return request  # an HTTP date: aiohttp compares it with the file's mtime
    try:
        stat = await asyncio.to_thread(path.stat)
    except OSError:
        return request  # FileResponse answers 404 itself
    if if_range.strip() == f'"{_etag_of(stat)}"':
        return request
    headers = CIMultiDict(request.headers)
    del headers[hdrs.RANGE]
    del headers[hdrs.IF_RANGE]
    return request.clone(headers=headers)


def _disposition(name: str) -> str:
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name) or "firmware.bin"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


@routes.get(DOWNLOAD_PATH)  # GET also answers HEAD
@public
async def download(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    file_name = request.match_info["fileName"]
    path = services.firmware.path_of(file_name)  # None for anything that is not a stored name
    package = await services.packages.find_by_file(file_name) if path is not None else None
    if path is None or package is None:
        return web.Response(status=404)  # as the original: a bare 404, nothing a device could flash
    if device_name := request.rel_url.query.get("deviceName"):
        await services.reports.note_download(file_name, device_name)  # evidence the upgrade is under way
    return FirmwareResponse(path, package.original_name, request.app[METRICS].bytes_served.inc)
