"""Firmware download for devices: exact bytes, Content-Length, resumable with Range."""

from __future__ import annotations

import asyncio
import os
import re
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
        try:
            request = await _without_stale_range(request, self._path)
        except UnsatisfiableRange:
            return await self._unsatisfiable(request)
        writer = await super().prepare(request)
        if self._on_sent is not None and request.method == "GET" and self.status in (200, 206):
            self._on_sent(self.content_length or 0)
        return writer

    async def _unsatisfiable(self, request: web.BaseRequest):
        """416 with the size, as RFC 9110 section 15.5.17 asks."""
        try:
            size = (await asyncio.to_thread(self._path.stat)).st_size
        except OSError:
            size = 0
        self.set_status(416)
        self.headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
        self.content_length = 0
        return await web.StreamResponse.prepare(self, request)


def _without_range(request: web.BaseRequest) -> web.BaseRequest:
    headers = CIMultiDict(request.headers)
    headers.popall(hdrs.RANGE, None)
    headers.popall(hdrs.IF_RANGE, None)
    return request.clone(headers=headers)


# "bytes=-0" and the like: the last zero bytes, a range that selects nothing.
_EMPTY_SUFFIX = re.compile(r"\s*bytes\s*=\s*-\s*0+\s*", re.IGNORECASE)


class UnsatisfiableRange(Exception):
    pass


async def _without_stale_range(request: web.BaseRequest, path: Path) -> web.BaseRequest:
    """aiohttp compares If-Range only as a date and serves a stale range when it holds an ETag
    (stack-notes). A range is only valid for the representation the client started with, so unless
    If-Range names our current ETag, or is a date (which aiohttp checks), we drop Range and send the
    whole file with 200 (RFC 9110 section 13.1.5).

    Also: several ranges in one request (aiohttp answers 416) get the whole file with 200, which
    RFC 9110 section 14.2 allows, rather than a multipart reply no firmware client parses; and a
    suffix of zero bytes is unsatisfiable (416; aiohttp sent the whole file as 206)."""
    range_header = request.headers.get(hdrs.RANGE)
    if range_header is None:
        return request
    if _EMPTY_SUFFIX.fullmatch(range_header):
        raise UnsatisfiableRange()
    if "," in range_header:
        return _without_range(request)
    if_range = request.headers.get(hdrs.IF_RANGE)
    if if_range is None:
        return request
    if request.if_range is not None:
        return request  # an HTTP date: aiohttp compares it with the file's mtime
    try:
        stat = await asyncio.to_thread(path.stat)
    except OSError:
        return request  # FileResponse answers 404 itself
    if if_range.strip() == f'"{_etag_of(stat)}"':
        return request
    return _without_range(request)


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
