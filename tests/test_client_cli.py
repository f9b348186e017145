"""The operator's CLI against a running daemon: real subprocesses, real HTTP."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def run_cli(otad, *args: str, token: bool = True, server: bool = True) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("OTAD_SERVER", "OTAD_TOKEN")}
    if server:
        env["OTAD_SERVER"] = otad.url
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
    assert "Traceback" not in result.stderr
    env = {**os.environ, "OTAD_SERVER": "http://127.0.0.1:9", "OTAD_TOKEN": "t"}
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "otad", "devices"], capture_output=True,
                                     text=True, timeout=60, env=env)
    assert result.returncode == 1 and "cannot reach" in result.stderr and "Traceback" not in result.stderr


async def test_errors_show_the_english_meaning_beside_the_chinese_message_once(otad):
    result = await asyncio.to_thread(run_cli, otad, "enable", "fw", "ghost")
    assert result.stderr.splitlines() == [
        "otad: error: 参数无效 (invalid parameter): no device named 'ghost' (errorCode 1001, HTTP 404)"]
    _, package = await otad.upload("fw", 3, b"x")
    await otad.add_device("dev1", 3)
    status, body = await otad.request("POST", "/api/v2/otaPassive", json={"deviceName": "dev1", "name": "fw",
                                                                          "versionName": "1.0"})
    assert status == 200, body
    result = await asyncio.to_thread(run_cli, otad, "package", "delete", str(package["data"]["id"]))
    assert result.returncode == 1
    assert result.stderr.startswith("otad: error: 存在依赖关系，无法删除 (still in use, cannot delete): used by ")
    assert result.stderr.count("still in use") == 1
    viewer = await otad.daemon.services.admins.create_token("watcher", role="viewer")
    result = await asyncio.to_thread(run_cli, otad, "--token", viewer, "package", "delete", "1", token=False)
    assert result.returncode == 1 and result.stderr.startswith(
        "otad: error: 没有权限 (not allowed: your role cannot do this): the viewer role")


async def test_not_logged_in_says_how_to_pass_a_token_and_how_to_make_one(otad):
    result = await asyncio.to_thread(run_cli, otad, "devices", token=False)
    first, hint = result.stderr.splitlines()
    assert first == "otad: error: 用户未登录 (not logged in) (errorCode 2001, HTTP 401)"
    assert "no token was given" in hint
    for way in ("--token TOKEN", "OTAD_TOKEN", "[client]", "otad token create NAME"):
        assert way in hint
    refused = await asyncio.to_thread(run_cli, otad, "--token", "not-a-token", "devices", token=False)
    assert "the token was refused" in refused.stderr and "(not logged in)" in refused.stderr


async def test_json_server_and_token_go_before_or_after_the_subcommand(otad):
    await otad.upload("fw", 3, b"x")
    given = ("--server", otad.url, "--token", otad.token)
    for args in (("--json", "package", "list"), ("package", "--json", "list"), ("package", "list", "--json"),
                 (*given, "--json", "package", "list"), ("package", *given, "list", "--json"),
                 ("--json", *given, "package", "list")):
        result = await asyncio.to_thread(run_cli, otad, *args, token="--token" not in args,
                                         server="--server" not in args)
        assert result.returncode == 0, (args, result.stderr)
        assert [package["name"] for package in json.loads(result.stdout)] == ["fw"], args
    # Both given: the subcommand's own option wins.
    wins = await asyncio.to_thread(run_cli, otad, "--token", "wrong", "--server", "http://127.0.0.1:9", "devices",
                                   "--token", otad.token, "--server", otad.url, token=False, server=False)
    assert wins.returncode == 0, wins.stderr
    loses = await asyncio.to_thread(run_cli, otad, "--token", otad.token, "devices", "--token", "wrong", token=False)
    assert loses.returncode == 1 and "2001" in loses.stderr
    campaign = await asyncio.to_thread(run_cli, otad, "--json", "campaign", "show")
    assert campaign.returncode == 0 and json.loads(campaign.stdout) == []


def test_the_client_is_a_leaf_that_never_imports_cli_or_daemon():
    tree = ast.parse((Path(__file__).parent.parent / "otad" / "client.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"otad.cli", "otad.daemon", "otad.composition"}, imported
