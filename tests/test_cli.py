"""The otad command as an operator runs it: a subprocess, real signals, real sockets."""

from __future__ import annotations

import ast
import asyncio
import os
import signal
import socket
import subprocess
import sys

from pathlib import Path

import aiohttp

from otad.config import KEYS
from tests.conftest import free_port, sqlite_only
from tests.helpers import serve as _serve, wait_for_port as _wait_for_port
from tests.mqtt_device import MqttDevice


def otad_cli(data_dir, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otad", *args, "--data-dir", str(data_dir)], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, **kwargs)


def test_token_create_list_revoke(tmp_path):
    created = otad_cli(tmp_path, "token", "create", "ci")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert len(secret) >= 32
    assert "ci" in otad_cli(tmp_path, "token", "list").stdout
    assert secret not in otad_cli(tmp_path, "token", "list").stdout  # stored hashed, never shown again
    duplicate = otad_cli(tmp_path, "token", "create", "ci")
    assert duplicate.returncode != 0 and "exists" in duplicate.stderr
    assert otad_cli(tmp_path, "token", "revoke", "ci").returncode == 0
    assert "ci" not in otad_cli(tmp_path, "token", "list").stdout
    assert otad_cli(tmp_path, "token", "revoke", "ci").returncode != 0


async def _slow_upload(http: aiohttp.ClientSession, http_port: int, token: str, parts: int):
    """An upload of ``parts`` x 10 kB sent over ``parts`` tenths of a second."""
    async def body():
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n'
        for _ in range(parts):
            await asyncio.sleep(0.1)
            yield b"s" * 10_000
        yield b"\r\n--B--\r\n"

    return await http.post(f"http://127.0.0.1:{http_port}/api/v2/otaUpload?name=fw&productId=1", data=body(),
                           headers={"Authorization": token, "Content-Type": "multipart/form-data; boundary=B"})


@sqlite_only("checks the notice about creating the SQLite file")
async def test_serve_runs_admin_commands_alongside_and_stops_on_sigterm(tmp_path):
    http_port, mqtt_port = free_port(), free_port()
    process = _serve(tmp_path, http_port, mqtt_port)
    try:
        await _wait_for_port(http_port, process)
        await _wait_for_port(mqtt_port, process)
        # Local admin commands work while the daemon runs, and the daemon sees their effect at once.
        token = (await asyncio.to_thread(otad_cli, tmp_path, "token", "create", "live")).stdout.splitlines()[-1]
        added = await asyncio.to_thread(otad_cli, tmp_path, "device", "add", "dev1", "--product-id", "3")
        assert added.returncode == 0, added.stderr
        password = added.stdout.splitlines()[-1]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{http_port}/api/v2/devices",
                                headers={"Authorization": token}) as response:
                body = await response.json()
        assert [(d["deviceName"], d["productId"]) for d in body["data"]] == [("dev1", 3)]
        device = MqttDevice(mqtt_port, "dev1", password)
        assert await device.connect() == 0
        await device.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    # The log names the data directory it started on, new here.
    assert f"no database in {tmp_path} yet: creating a new one" in stderr


async def test_sigterm_lets_an_in_flight_request_finish(tmp_path):
    http_port, mqtt_port = free_port(), free_port()
    token = otad_cli(tmp_path, "token", "create", "t").stdout.splitlines()[-1]
    process = _serve(tmp_path, http_port, mqtt_port)
    try:
        await _wait_for_port(http_port, process)

        async with aiohttp.ClientSession() as http:
            upload = asyncio.create_task(_slow_upload(http, http_port, token, parts=10))
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            response = await upload
            assert response.status == 200
            assert (await response.json())["data"]["size"] == 100_000
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0


def test_port_in_use_is_one_clear_line_and_non_zero_exit(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag, other in (("--http-port", "--mqtt-port"), ("--mqtt-port", "--http-port")):
            result = subprocess.run(
                [sys.executable, "-m", "otad", "serve", "--data-dir", str(tmp_path), "--http-host", "127.0.0.1",
                 "--mqtt-host", "127.0.0.1", flag, str(port), other, str(free_port()), "--log-level", "error"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert result.returncode != 0
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and str(port) in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_unwritable_data_dir_is_one_clear_line_and_non_zero_exit(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "otad", "serve", "--data-dir", str(blocker / "data"), "--http-port", str(free_port()),
         "--mqtt-port", str(free_port()), "--http-host", "127.0.0.1", "--mqtt-host", "127.0.0.1"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0], result.stderr


def test_device_add_prints_password_last_and_user_add_takes_password(tmp_path):
    added = otad_cli(tmp_path, "device", "add", "gw-1", "--product-id", "12")
    assert added.returncode == 0
    assert len(added.stdout.splitlines()[-1]) >= 32
    bad = otad_cli(tmp_path, "device", "add", "gw/2", "--product-id", "12")
    assert bad.returncode != 0 and "deviceName" in bad.stderr
    assert otad_cli(tmp_path, "user", "add", "admin", "--password", "pw-123").returncode == 0


@sqlite_only("checks the SQLite file the command created")
def test_env_configures_admin_commands_too(tmp_path):
    env = {**os.environ, "OTAD_DATA_DIR": str(tmp_path / "from-env")}
    result = subprocess.run([sys.executable, "-m", "otad", "token", "create", "e"], capture_output=True, text=True,
                            timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0
    assert (tmp_path / "from-env" / "otad.sqlite3").exists()


async def test_ready_is_notified_to_systemd_once_both_listeners_are_up(tmp_path):
    notify_path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify_path)
    receiver.settimeout(20)
    http_port, mqtt_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "otad", "serve", "--data-dir", str(tmp_path / "d"), "--http-host", "127.0.0.1",
         "--http-port", str(http_port), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port)],
        env={**os.environ, "NOTIFY_SOCKET": notify_path}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = (await asyncio.to_thread(receiver.recv, 4096)).decode()
        assert first == "READY=1"
        for port in (http_port, mqtt_port):  # both accept connections by the time READY=1 was sent
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        process.send_signal(signal.SIGTERM)
        messages = []
        while "STOPPING=1" not in messages:
            messages.append((await asyncio.to_thread(receiver.recv, 4096)).decode())
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.communicate, timeout=30)
        receiver.close()
    assert process.returncode == 0


async def test_a_second_daemon_on_the_same_data_dir_refuses_and_harms_nothing(tmp_path):
    http_port, mqtt_port = free_port(), free_port()
    token = otad_cli(tmp_path, "token", "create", "t").stdout.splitlines()[-1]
    first = _serve(tmp_path, http_port, mqtt_port)
    try:
        await _wait_for_port(http_port, first)

        async with aiohttp.ClientSession() as http:
            upload = asyncio.create_task(_slow_upload(http, http_port, token, parts=15))
            await asyncio.sleep(0.4)
            second = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "otad", "serve", "--data-dir", str(tmp_path),
                                 "--http-port", str(free_port()), "--mqtt-port", str(free_port()),
                                 "--http-host", "127.0.0.1", "--mqtt-host", "127.0.0.1"],
                capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
            assert second.returncode != 0 and "already running" in second.stderr
            response = await upload
            assert response.status == 200
            assert (await response.json())["data"]["size"] == 150_000
    finally:
        first.send_signal(signal.SIGTERM)
        await asyncio.to_thread(first.communicate, timeout=30)


@sqlite_only("checks the notice about creating the SQLite file")
def test_admin_commands_name_their_data_dir_on_stderr_and_say_when_they_create_a_database(tmp_path):
    created = otad_cli(tmp_path, "token", "create", "ci")
    assert created.returncode == 0, created.stderr
    assert f"otad: no database in {tmp_path} yet: creating a new one" in created.stderr
    assert "--data-dir" in created.stderr and "OTAD_DATA_DIR" in created.stderr
    assert len(created.stdout.splitlines()) == 1  # stdout is the secret alone, for scripts
    listed = otad_cli(tmp_path, "token", "list")
    assert listed.stderr.splitlines() == [f"otad: data directory {tmp_path}"]
    assert listed.stdout.startswith("ci\t")


@sqlite_only("checks the notice about creating the SQLite file")
def test_an_admin_command_without_data_dir_says_it_creates_a_database_in_the_default_place(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("OTAD_DATA_DIR", "STATE_DIRECTORY")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    result = subprocess.run([sys.executable, "-m", "otad", "device", "add", "dev1", "--product-id", "1"],
                            capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert f"no database in {tmp_path / 'xdg' / 'otad'} yet: creating a new one" in result.stderr.splitlines()[0]
    assert len(result.stdout.splitlines()) == 1  # the MQTT password


def test_check_config_prints_every_effective_setting_with_secrets_masked(tmp_path):
    config = tmp_path / "otad.toml"
    config.write_text('[http]\nport = 8081\n[client]\ntoken = "s3cret-token"\n'
                      '[xiaozhi.mqtt]\nendpoint = "mqtt.example"\npassword = "board-pw"\n')
    env = {**os.environ, "OTAD_MQTT_PORT": "1999"}
    result = subprocess.run([sys.executable, "-m", "otad", "check-config", "--config", str(config), "--data-dir",
                             str(tmp_path), "--log-level", "debug"], capture_output=True, text=True, timeout=60,
                            env=env, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" = ")[0] for line in lines[:-1]] == [key.path for key in KEYS]
    assert lines[-1] == "configuration OK"
    shown = dict(line.split(" = ", 1) for line in lines[:-1])
    assert (shown["http.port"], shown["mqtt.port"], shown["log_level"]) == ("8081", "1999", '"debug"')
    assert shown["data_dir"] == f'"{tmp_path}"' and shown["mqtt.allow_anonymous"] == "false"
    assert shown["upgrade.timeout"] == "86400.0" and shown["http.certfile"] == "(not set)"
    assert "s3cret-token" not in result.stdout and "board-pw" not in result.stdout
    assert shown["client.token"] == "(set, not shown)" and "mqtt.example" in shown["xiaozhi.mqtt"]


def test_a_bad_config_exits_2_which_the_systemd_unit_does_not_restart(tmp_path):
    config = tmp_path / "otad.toml"
    config.write_text("[http]\nport = 0\n")
    result = subprocess.run([sys.executable, "-m", "otad", "serve", "--config", str(config), "--data-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "otad: error: config file key 'http.port': must be a port between 1 and 65535 (got 0)"]
    unit = (Path(__file__).parent.parent / "systemd" / "otad.service").read_text().splitlines()
    assert "Restart=on-failure" in unit and "RestartPreventExitStatus=2" in unit


def test_services_are_built_in_one_place_for_the_daemon_and_the_admin_commands():
    package = Path(__file__).parent.parent / "otad"
    callers = {path.relative_to(package).as_posix() for path in package.rglob("*.py")
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "build_services"}
    assert callers == {"composition.py"}


def test_users_and_tokens_get_a_role_and_the_lists_show_it(tmp_path):
    assert otad_cli(tmp_path, "user", "add", "vera", "--password", "vera-pass", "--role", "viewer").returncode == 0
    added = otad_cli(tmp_path, "user", "add", "adam", "--password", "adam-pass")
    assert added.returncode == 0 and "added admin user 'adam'" in added.stdout, added.stderr
    assert otad_cli(tmp_path, "user", "list").stdout.splitlines() == ["adam\tadmin", "vera\tviewer"]

    viewer = otad_cli(tmp_path, "token", "create", "watcher", "--role", "viewer")
    assert viewer.returncode == 0 and "created viewer token 'watcher'" in viewer.stderr, viewer.stderr
    assert otad_cli(tmp_path, "token", "create", "ci").returncode == 0
    lines = {line.split("\t")[0]: line.split("\t")[1:3] for line in otad_cli(tmp_path, "token", "list").stdout.splitlines()}
    assert lines == {"ci": ["api", "role admin"], "watcher": ["api", "role viewer"]}

    unknown = otad_cli(tmp_path, "token", "create", "root", "--role", "root")
    assert unknown.returncode == 2 and "'admin', 'viewer'" in unknown.stderr
