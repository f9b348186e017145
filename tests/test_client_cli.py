"""The operator's CLI against a running daemon: real subprocesses, real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys


def run_cli(otad, *args: str, token: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OTAD_SERVER": otad.url}
    if token:
        env["OTAD_TOKEN"] = otad.token
    return subprocess.run([sys.executable, "-m", "otad", *args], capture_output=True, text=True, timeout=60,
                          env=env, stdin=subprocess.DEVNULL)


async def test_upload_list_enable_and_history_from_the_cli(otad, tmp_path):
    firmware = tmp_path / "app.bin"
    firmware.write_bytes(os.urandom(700_000))
    await otad.add_device("dev1", 3)
    result = await asyncio.to_thread(run_cli, otad, "package", "upload", str(firmware), "--name", "fw", "--product-id",
                                     "3", "--version", "1.2.0")
    assert result.returncode == 0, result.stderr
    assert f"md5    {hashlib.md5(firmware.read_bytes()).hexdigest()}" in result.stdout
    assert f"sha256 {hashlib.sha256(firmware.read_bytes()).hexdigest()}" in result.stdout

    listed = await asyncio.to_thread(run_cli, otad, "package", "list", "--json")
    packages = json.loads(listed.stdout)
    assert [(p["name"], p["version"], p["size"]) for p in packages] == [("fw", "1.2.0", 700_000)]
    table = (await asyncio.to_thread(run_cli, otad, "package", "list")).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "PRODUCT"] and "fw" in table[1]

    enabled = await asyncio.to_thread(run_cli, otad, "enable", "fw", "dev1")
    assert enabled.returncode == 0 and "sent to dev1" in enabled.stdout
    history = json.loads((await asyncio.to_thread(run_cli, otad, "upgrades", "--device", "dev1", "--json")).stdout)
    assert history["total"] == 1 and history["items"][0]["state"] == "notified"
    devices = (await asyncio.to_thread(run_cli, otad, "devices")).stdout
    assert "dev1" in devices


async def test_campaign_commands(otad):
    await otad.add_device("dev1", 3)
    await otad.upload("fw", 3, b"x")
    created = await asyncio.to_thread(run_cli, otad, "campaign", "create", "fw", "--product-id", "3", "--stages",
                                      "50,100", "--json")
    assert created.returncode == 0, created.stderr
    campaign_id = str(json.loads(created.stdout)["id"])
    paused = await asyncio.to_thread(run_cli, otad, "campaign", "pause", campaign_id)
    assert paused.returncode == 0 and "paused" in paused.stdout
    shown = await asyncio.to_thread(run_cli, otad, "campaign", "show", campaign_id, "--json")
    assert json.loads(shown.stdout)["state"] == "paused"
    assert (await asyncio.to_thread(run_cli, otad, "campaign", "cancel", campaign_id)).returncode == 0


async def test_errors_print_the_envelope_message_and_exit_non_zero(otad):
    result = await asyncio.to_thread(run_cli, otad, "enable", "fw", "ghost")
    assert result.returncode == 1 and "no device named 'ghost'" in result.stderr and "errorCode 1001" in result.stderr
    result = await asyncio.to_thread(run_cli, otad, "devices", token=False)
    assert result.returncode == 1 and "2001" in result.stderr
    env = {**os.environ, "OTAD_SERVER": "http://127.0.0.1:9", "OTAD_TOKEN": "t"}
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "otad", "devices"], capture_output=True,
                                     text=True, timeout=60, env=env)
    assert result.returncode == 1 and "cannot reach" in result.stderr and "Traceback" not in result.stderr
