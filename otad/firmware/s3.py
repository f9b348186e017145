"""Firmware in an S3-compatible bucket (``s3://bucket/prefix``), through aiobotocore.

aiobotocore rather than a SigV4 client of our own: it is botocore's request signing, credential
chain (the AWS_* variables, ~/.aws, instance roles), retries and error parsing on aiohttp, which
otad already runs on, and its response bodies stream. Uploads go up as a multipart upload of
``PART_SIZE`` parts (one part in flight while the next is read), hashed on the way, so a file is
never whole in memory or on local disk; a file smaller than one part is one PUT. An object only
appears under its key once it is complete, so a partial upload is never served.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from otad import firmware
from otad.errors import MissingInput, StartupError, StorageUnavailable, TooLarge

log = logging.getLogger(__name__)

_READ_CHUNK = 256 * 1024


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix/``); the prefix may be empty."""
    parts = urlsplit(url)
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


@contextlib.contextmanager
def _s3_errors(operation: str) -> Iterator[None]:
    """Whatever the bucket answers or the network does becomes StorageUnavailable (503, and
    /healthz shows it), with S3's error code and never a credential."""
    try:
        yield
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise StorageUnavailable(f"firmware store: S3 {operation} failed: {code}") from None
    except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise StorageUnavailable(f"firmware store: S3 {operation} failed: {type(exc).__name__}") from None


def _is_missing(exc: Exception) -> bool:
    error = getattr(exc, "response", {}).get("Error", {})
    return error.get("Code") in ("NoSuchKey", "404", "NotFound")


class S3Store(firmware.FirmwareStore):
    PART_SIZE = 8 * 1024 * 1024  # S3's minimum is 5 MiB for every part but the last

    def __init__(self, url: str, endpoint: str = "", grace: float = firmware.SHARED_GRACE) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        # firmware.s3_endpoint, else the usual AWS variable; neither: AWS itself.
        self._endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL") or None
        self._region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self._grace = grace
        self._stack = contextlib.AsyncExitStack()
        self._client = None
        self._opening = asyncio.Lock()

    def describe(self) -> str:
        return f"S3 bucket {self.bucket} prefix '{self.prefix}' at {self._endpoint or 'AWS'}"

    def key_of(self, file_name: str) -> str:
        return self.prefix + file_name

    async def _s3(self):
        """The client, created on first use (an admin command that never touches firmware makes none)."""
        async with self._opening:
            if self._client is None:
                config = AioConfig(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                                   # Servers other than AWS are addressed by path (no bucket DNS names).
                                   s3={"addressing_style": "path"} if self._endpoint else None)
                self._client = await self._stack.enter_async_context(get_session().create_client(
                    "s3", region_name=self._region, endpoint_url=self._endpoint, config=config))
            return self._client

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None

    async def prepare(self) -> None:
        """The bucket must answer; multipart uploads a crash left are aborted once they are old."""
        try:
            with _s3_errors("HeadBucket"):
                await (await self._s3()).head_bucket(Bucket=self.bucket)
        except StorageUnavailable as exc:
            raise StartupError(f"{self.describe()}: {exc.message}") from None
        with _s3_errors("ListMultipartUploads"):
            s3 = await self._s3()
            async for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for upload in page.get("Uploads", []):
                    if self._is_old(upload["Initiated"]):
                        log.warning("aborting partial upload left from an earlier run: %s", upload["Key"])
                        await s3.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])

    def _is_old(self, when: datetime) -> bool:
        return (datetime.now(timezone.utc) - when).total_seconds() >= self._grace

    async def sweep_orphans(self, known: set[str]) -> None:
        with _s3_errors("ListObjectsV2"):
            s3 = await self._s3()
            async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(self.prefix):]
                    if firmware.STORED_NAME.fullmatch(name) and name not in known and self._is_old(entry["LastModified"]):
                        log.warning("removing firmware object with no package: %s", entry["Key"])
                        await s3.delete_object(Bucket=self.bucket, Key=entry["Key"])

    async def receive(self, chunks: AsyncIterator[bytes], original_name: str | None, max_size: int) -> firmware.StoredFile:
        file_name = f"{uuid.uuid4()}{firmware.stored_extension(original_name)}"
        upload = _Upload(await self._s3(), self.bucket, self.key_of(file_name))
        buffer = bytearray()
        try:
            async for chunk in chunks:
                if upload.size + len(buffer) + len(chunk) > max_size:
                    raise TooLarge(f"文件过大: the upload exceeds the limit of {max_size} bytes")
                buffer += chunk
                if len(buffer) >= self.PART_SIZE:
                    await upload.send_part(bytes(buffer))
                    buffer.clear()
            if upload.size + len(buffer) == 0:
                raise MissingInput("参数缺失: the uploaded file is empty")
            await upload.finish(bytes(buffer))
        except BaseException:
            await asyncio.shield(upload.abandon())
            raise
        return firmware.StoredFile(file_name=file_name, size=upload.size, md5=upload.md5.hexdigest(),
                                   sha256=upload.sha256.hexdigest())

    async def discard(self, file_name: str) -> None:
        if firmware.STORED_NAME.fullmatch(file_name):
            with _s3_errors("DeleteObject"):
                await (await self._s3()).delete_object(Bucket=self.bucket, Key=self.key_of(file_name))

    async def probe(self) -> None:
        key = f"{self.prefix}.probe-{uuid.uuid4().hex}"
        with _s3_errors("PutObject"):
            s3 = await self._s3()
            await s3.put_object(Bucket=self.bucket, Key=key, Body=b"\0" * 4096)
            await s3.delete_object(Bucket=self.bucket, Key=key)

    async def read(self, file_name: str, start: int, length: int) -> firmware.Reading | None:
        """The range goes to S3 as it is: only the bytes asked for cross the network."""
        if not firmware.STORED_NAME.fullmatch(file_name) or length <= 0:
            return None
        with _s3_errors("GetObject"):
            try:
                response = await (await self._s3()).get_object(
                    Bucket=self.bucket, Key=self.key_of(file_name), Range=f"bytes={start}-{start + length - 1}")
            except ClientError as exc:
                if _is_missing(exc):
                    return None
                raise
        return _ObjectReading(response["Body"])


class _Upload:
    """One object on its way up: parts sent one at a time while the next is read, each hashed in
    threads (hashlib releases the GIL) while it is sent, in order."""

    def __init__(self, s3, bucket: str, key: str) -> None:
        self._s3, self._bucket, self._key = s3, bucket, key
        self.md5, self.sha256, self.size = hashlib.md5(), hashlib.sha256(), 0
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._in_flight: asyncio.Future | None = None
        self._put = False

    async def _hash(self, data: bytes) -> None:
        await asyncio.gather(asyncio.to_thread(self.md5.update, data), asyncio.to_thread(self.sha256.update, data))

    async def send_part(self, data: bytes) -> None:
        await self._settle()
        if self._upload_id is None:
            with _s3_errors("CreateMultipartUpload"):
                created = await self._s3.create_multipart_upload(Bucket=self._bucket, Key=self._key,
                                                                 ContentType="application/octet-stream")
            self._upload_id = created["UploadId"]
        self.size += len(data)
        self._in_flight = asyncio.gather(self._hash(data), self._upload_part(len(self._parts) + 1, data))

    async def _upload_part(self, number: int, data: bytes) -> None:
        with _s3_errors("UploadPart"):
            answer = await self._s3.upload_part(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                                PartNumber=number, Body=data)
        self._parts.append({"ETag": answer["ETag"], "PartNumber": number})

    async def _settle(self) -> None:
        if self._in_flight is not None:
            in_flight, self._in_flight = self._in_flight, None
            await in_flight

    async def finish(self, rest: bytes) -> None:
        """The last bytes: the whole object in one PUT when no part went up yet."""
        if self._upload_id is None:
            await self._hash(rest)
            self.size += len(rest)
            self._put = True  # from here on a failure may have left the object: abandon() removes it
            with _s3_errors("PutObject"):
                await self._s3.put_object(Bucket=self._bucket, Key=self._key, Body=rest,
                                          ContentType="application/octet-stream")
            return
        if rest:
            await self.send_part(rest)
        await self._settle()
        with _s3_errors("CompleteMultipartUpload"):
            await self._s3.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                                     MultipartUpload={"Parts": self._parts})
        self._upload_id, self._put = None, True

    async def abandon(self) -> None:
        """After a failure: no part stays billed in the bucket, no partial object stays."""
        if self._in_flight is not None:
            await asyncio.gather(self._in_flight, return_exceptions=True)
        try:
            if self._upload_id is not None:
                await self._s3.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
            if self._put:
                await self._s3.delete_object(Bucket=self._bucket, Key=self._key)
        except Exception as exc:  # the sweep at the next start removes it once it is old
            log.warning("could not clean up the failed upload %s: %s", self._key, exc)


class _ObjectReading(firmware.Reading):
    def __init__(self, body) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _s3_errors("GetObject"):
            async for chunk in self._body.iter_chunks(_READ_CHUNK):
                yield chunk

    async def aclose(self) -> None:
        self._body.close()
