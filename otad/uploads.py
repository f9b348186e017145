"""Reading a firmware upload from an aiohttp multipart body, for the API and the dashboard alike.

The file part is streamed to the firmware store chunk by chunk, never held whole in memory, and
every read is bounded by an idle timeout: a sender that stops sending is refused, not waited on.
The API and the dashboard take their other fields differently (the API in the query string, the
dashboard as form fields before the file), so both read the body through the functions here and
an upload is checked the same way wherever it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from otad.errors import InvalidInput, MissingInput, TooLarge, UnsupportedEncoding

CHUNK = 1024 * 1024
# Multipart framing around the file (and the dashboard's few small fields before it): a little
# over the limit is still a legal upload.
MULTIPART_SLACK = 64 * 1024
# A text field before the file (a name, a version, a description of at most 4096 characters).
MAX_FIELD = 16 * 1024


@contextlib.asynccontextmanager
async def _reading(idle_timeout: float) -> AsyncIterator[None]:
    """One read of the body: within ``idle_timeout``, and aiohttp's reports of malformed framing
    or headers ("Reading after EOF" and the like) as the client's error."""
    try:
        async with asyncio.timeout(idle_timeout):
            yield
    except TimeoutError:
        raise InvalidInput(f"参数无效: the upload sent nothing for {idle_timeout:g} s") from None
    except (ValueError, HttpProcessingError) as exc:
        raise InvalidInput(f"参数无效: malformed multipart body: {exc}") from None


def refuse_oversized(request: web.Request, max_upload_size: int) -> None:
    """Refuse a body whose declared length is over the limit before reading any of it."""
    if request.content_length is not None and request.content_length > max_upload_size + MULTIPART_SLACK:
        raise TooLarge(f"文件过大: the upload exceeds the limit of {max_upload_size} bytes")


async def open_multipart(request: web.Request, idle_timeout: float) -> MultipartReader:
    """The body's multipart reader. Compressed bodies are refused: inflating one would be the
    sender's choice of our disk and CPU, and aiohttp would inflate it before we count its bytes."""
    if not request.content_type.startswith("multipart/"):
        raise MissingInput("参数缺失: send the firmware as multipart form field 'file'")
    if request.headers.get(hdrs.CONTENT_ENCODING, "identity").strip().lower() not in ("", "identity"):
        raise UnsupportedEncoding()
    async with _reading(idle_timeout):
        return await request.multipart()


async def next_part(reader: MultipartReader, idle_timeout: float) -> MultipartReader | BodyPartReader | None:
    """The body's next part (None after the last)."""
    async with _reading(idle_timeout):
        return await reader.next()


async def read_field(part: BodyPartReader, idle_timeout: float, limit: int = MAX_FIELD) -> str:
    """A small text part, at most ``limit`` bytes (more is refused, never cut short)."""
    data = bytearray()
    while True:
        async with _reading(idle_timeout):
            chunk = await part.read_chunk(limit + 1)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise InvalidInput(f"参数无效: form field '{part.name}' is over {limit} bytes")
    try:
        return data.decode(part.get_charset("utf-8"))
    except (UnicodeDecodeError, LookupError):
        raise InvalidInput(f"参数无效: form field '{part.name}' is not valid text") from None


async def file_part(reader: MultipartReader, idle_timeout: float,
                    fields: Collection[str] = ()) -> tuple[dict[str, str], BodyPartReader]:
    """The ``file`` part, and the text of the parts named in ``fields`` that come before it
    (others are skipped). Fields after the file are not read: a form puts them first."""
    found: dict[str, str] = {}
    while (part := await next_part(reader, idle_timeout)) is not None:
        if isinstance(part, BodyPartReader) and part.name == "file":
            return found, part
        if isinstance(part, BodyPartReader) and part.name in fields:
            found[part.name] = await read_field(part, idle_timeout)
        else:
            async with _reading(idle_timeout):
                await part.release()
    raise MissingInput("参数缺失: multipart form field 'file'")


async def part_chunks(reader: MultipartReader, part: BodyPartReader, idle_timeout: float) -> AsyncIterator[bytes]:
    """The file's bytes, then the rest of the form checked. A body cut off before the closing
    boundary is an error, not a shorter firmware: aiohttp's reader simply stops, and the stored
    image would be truncated. A body that sends nothing for ``idle_timeout`` is refused, and so
    is a second ``file`` part (which one would be the firmware?). Raised here, each leaves
    nothing stored."""
    while True:
        async with _reading(idle_timeout):
            chunk = await part.read_chunk(CHUNK)
        if not chunk:
            break
        yield chunk
    if not part.at_eof():
        raise InvalidInput("参数无效: the upload ended before the multipart closing boundary")
    while (extra := await next_part(reader, idle_timeout)) is not None:
        if isinstance(extra, BodyPartReader) and extra.name == "file":
            raise InvalidInput("参数无效: more than one 'file' part; send one firmware per upload")
        async with _reading(idle_timeout):
            await extra.release()
