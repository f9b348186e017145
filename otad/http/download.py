"""Firmware download for devices: exact bytes, Content-Length, resumable with Range.

The ETag is the package's sha256 from the database, whatever the store: every node sharing a
store answers the same one, so a download resumed on another node (If-Range) continues the same
bytes. A store with files on this machine is sent with sendfile; an S3 store's bytes are streamed,
with the Range passed through to the bucket.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import quote

from aiohttp import hdrs, web
from multidict import CIMultiDict

from otad.firmware import STORED_NAME, FirmwareStore
from otad.http.auth import public
from otad.http.keys import METRICS, SERVICES
from otad.http.urls import DOWNLOAD_PATH
from otad.service import PackageRecord

routes = web.RouteTableDef()


def package_etag(package: PackageRecord) -> str:
    """The strong ETag (unquoted) every node gives the package's file."""
    return package.sha256


def _set_package_etag(response: web.StreamResponse, _value) -> None:
    web.StreamResponse.etag.fset(response, response.package_etag)


class FirmwareResponse(web.FileResponse):
    """``FileResponse`` that serves the stored bytes only, with the package's ETag."""

    def __init__(self, path: Path, package: PackageRecord, on_sent=None) -> None:
        super().__init__(path, headers={hdrs.CONTENT_DISPOSITION: _disposition(package.original_name)})
        self.package_etag = package_etag(package)
        self._on_sent = on_sent

    # FileResponse sets its ETag from the file's mtime and size, which a copy of the file (or a
    # re-upload of the same bytes) does not keep; whatever it assigns, the header is the package's.
    etag = property(web.StreamResponse.etag.fget, _set_package_etag)

    def _get_file_path_stat_encoding(self, accept_encoding: str):
        # Never substitute a ".gz"/".br" sibling: firmware must be the exact uploaded bytes.
        return super()._get_file_path_stat_encoding("")

    async def prepare(self, request: web.BaseRequest):
        try:
            request = _with_checked_range(request, self.package_etag)
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


def _without(request: web.BaseRequest, *names: str) -> web.BaseRequest:
    headers = CIMultiDict(request.headers)
    for name in names:
        headers.popall(name, None)
    return request.clone(headers=headers)


def _without_range(request: web.BaseRequest) -> web.BaseRequest:
    return _without(request, hdrs.RANGE, hdrs.IF_RANGE)


# "bytes=-0" and the like: the last zero bytes, a range that selects nothing.
_EMPTY_SUFFIX = re.compile(r"\s*bytes\s*=\s*-\s*0+\s*", re.IGNORECASE)


class UnsatisfiableRange(Exception):
    pass


def _without_stale_range(request: web.BaseRequest, etag: str) -> web.BaseRequest:
    """aiohttp compares If-Range only as a date and serves a stale range when it holds an ETag
    (stack-notes). A range is only valid for the representation the client started with, so unless
    If-Range names our ETag, or is a date (which aiohttp checks), we drop Range and send the
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
    if if_range is None or request.if_range is not None:
        return request  # no condition, or an HTTP date: compared with Last-Modified
    if if_range.strip() == f'"{etag}"':
        return request
    return _without_range(request)


def _with_checked_range(request: web.BaseRequest, etag: str) -> web.BaseRequest:
    """The request with our ETag's If-Match / If-None-Match already decided (aiohttp would
    compare them with its own ETag): a request that fails them is answered by ``precondition``."""
    names = [hdrs.IF_MATCH, hdrs.IF_NONE_MATCH]
    if request.if_match is not None:
        names.append(hdrs.IF_UNMODIFIED_SINCE)  # ignored beside If-Match (RFC 9110 section 13.1.4)
    if request.if_none_match is not None:
        names.append(hdrs.IF_MODIFIED_SINCE)  # likewise beside If-None-Match (section 13.1.3)
    return _without_stale_range(_without(request, *names), etag)


def _etag_matches(etag: str, candidates, *, weak: bool) -> bool:
    return any(c.value in ("*", etag) for c in candidates if weak or not c.is_weak)


def precondition(request: web.BaseRequest, etag: str) -> int | None:
    """412 or 304 by If-Match and If-None-Match against the package's ETag; None: go on."""
    if request.if_match is not None and not _etag_matches(etag, request.if_match, weak=False):
        return 412
    if request.if_none_match is not None and _etag_matches(etag, request.if_none_match, weak=True):
        return 304
    return None


def _disposition(name: str) -> str:
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name) or "firmware.bin"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


@routes.get(DOWNLOAD_PATH)  # GET also answers HEAD
@public
async def download(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    file_name = request.match_info["fileName"]
    # Anything that is not a stored name is never looked up, nor turned into a path or a key.
    package = await services.packages.find_by_file(file_name) if STORED_NAME.fullmatch(file_name) else None
    upgrade_file = file_name
    if package is None and STORED_NAME.fullmatch(file_name):
        # A delta patch downloads like firmware (a DeltaRecord has the fields used below); fetching
        # it is evidence of the upgrade to its package.
        package = await services.deltas.find_by_file(file_name)
        upgrade_file = package.target_file_name if package is not None else file_name
    if package is None:
        return web.Response(status=404)  # as the original: a bare 404, nothing a device could flash
    if device_name := request.rel_url.query.get("deviceName"):
        await services.reports.note_download(upgrade_file, device_name)  # evidence the upgrade is under way
    etag = package_etag(package)
    if (status := precondition(request, etag)) is not None:
        return web.Response(status=status, headers={hdrs.ETAG: f'"{etag}"'})
    on_sent = request.app[METRICS].bytes_served.inc
    path = services.firmware.path_of(file_name)
    if path is not None:
        return FirmwareResponse(path, package, on_sent)
    return await streamed(request, services.firmware, package, on_sent)


async def streamed(request: web.Request, store: FirmwareStore, package: PackageRecord, on_sent) -> web.StreamResponse:
    """A store without local files: the range asked for is read from the store and streamed."""
    etag = package_etag(package)
    headers = {hdrs.CONTENT_DISPOSITION: _disposition(package.original_name), hdrs.ETAG: f'"{etag}"',
               hdrs.ACCEPT_RANGES: "bytes", hdrs.CONTENT_TYPE: "application/octet-stream"}
    response = web.StreamResponse(headers=headers)
    response.last_modified = package.created_at
    try:
        checked = _with_checked_range(request, etag)
        if checked.if_range is not None and package.created_at.timestamp() > checked.if_range.timestamp():
            checked = _without_range(checked)  # changed since the date the client holds
        start, count = _byte_range(checked, package.size)
    except UnsatisfiableRange:
        response.set_status(416)
        response.headers[hdrs.CONTENT_RANGE] = f"bytes */{package.size}"
        response.content_length = 0
        await response.prepare(request)
        return response
    partial = hdrs.RANGE in checked.headers
    if partial:
        response.set_status(206)
        response.headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{start + count - 1}/{package.size}"
    response.content_length = count
    if request.method == "HEAD" or count == 0:
        await response.prepare(request)
        return response
    reading = await store.read(package.file_name, start, count)
    if reading is None:
        return web.Response(status=404)
    try:
        await response.prepare(request)
        on_sent(count)
        async for chunk in reading:
            await response.write(chunk)
        await response.write_eof()
    finally:
        await reading.aclose()
    return response


def _byte_range(request: web.BaseRequest, size: int) -> tuple[int, int]:
    """(first byte, count) of the one range asked for, or of the whole file; the same reading of
    Range as aiohttp's FileResponse, so every store answers a range alike."""
    try:
        asked = request.http_range
    except ValueError:
        raise UnsatisfiableRange() from None
    start, stop = asked.start, asked.stop
    if start is None:
        return 0, size
    if start < 0 and stop is None:
        start = max(size + start, 0)
        count = size - start
    else:
        count = min(stop if stop is not None else size, size) - start
    if start >= size:
        raise UnsatisfiableRange()
    return start, count
