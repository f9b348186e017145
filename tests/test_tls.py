"""TLS and WebSocket listeners with real clients: mosquitto_sub over TLS, curl against HTTPS, a
client certificate standing for the device, paho-mqtt over WebSocket, and certificates re-read on
SIGHUP by a running ``otad serve``. The certificates are made here with the openssl command."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import paho.mqtt.client as mqtt
import pytest

from otad.config import ConfigError, load_settings
from tests.dashboard import csrf_of
from tests.conftest import free_port, make_settings, start_otad
from tests.helpers import wait_for_port
from tests.mqtt_device import MqttDevice
from tests.rawmqtt import connect_packet

pytestmark = pytest.mark.timeout(60)

OPENSSL = shutil.which("openssl")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
CURL = shutil.which("curl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed (CI installs it)")
needs_mosquitto_sub = pytest.mark.skipif(MOSQUITTO_SUB is None,
                                         reason="mosquitto_sub is not installed (mosquitto-clients; CI installs it)")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (CI installs it)")

COMMAND_TOPIC = "/oc/devices/{}/sys/ota"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN=dev1
    client_key: Path
    other_ca: Path  # a CA the daemon does not trust
    other_client_cert: Path  # CN=dev1, signed by other_ca
    other_client_key: Path
    directory: Path

    def server_pair(self, serial: int) -> tuple[Path, Path]:
        """Another server certificate (same CA and names), told apart by its serial number."""
        return _signed(self.directory, f"server-{serial}", "localhost", self.ca, self.ca.with_suffix(".key"),
                       serial, "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")


def _openssl(*args: str) -> None:
    subprocess.run([OPENSSL, *args], check=True, capture_output=True)


def _ca(directory: Path, name: str) -> Path:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert


def _signed(directory: Path, name: str, common_name: str, ca: Path, ca_key: Path, serial: int,
            extensions: str) -> tuple[Path, Path]:
    cert, key, csr = directory / f"{name}.pem", directory / f"{name}.key", directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-set_serial", str(serial),
             "-days", "2", "-out", str(cert), "-extfile", str(ext))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    if OPENSSL is None:
        pytest.skip("the openssl command is not installed (CI installs it)")
    directory = tmp_path_factory.mktemp("pki")
    ca = _ca(directory, "ca")
    server_cert, server_key = _signed(directory, "server", "localhost", ca, directory / "ca.key", 1,
                                      "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client_cert, client_key = _signed(directory, "client", "dev1", ca, directory / "ca.key", 100,
                                      "extendedKeyUsage=clientAuth\n")
    other_ca = _ca(directory, "other-ca")
    other_cert, other_key = _signed(directory, "other-client", "dev1", other_ca, directory / "other-ca.key", 200,
                                    "extendedKeyUsage=clientAuth\n")
    return Pki(ca, server_cert, server_key, client_cert, client_key, other_ca, other_cert, other_key, directory)


async def _tls_otad(tmp_path: Path, pki: Pki, *, cafile: bool = False, **flags):
    settings = {"mqtt.tls_port": free_port(), "mqtt.certfile": str(pki.server_cert),
                "mqtt.keyfile": str(pki.server_key), **flags}
    if cafile:
        settings["mqtt.cafile"] = str(pki.ca)
    return await start_otad(make_settings(tmp_path / "data", **settings))


async def _stop(instance) -> None:
    await instance.stop()


async def _device_with_command(instance, name: str = "dev1") -> tuple[str, str]:
    """Register ``name``, upload a package and enable it for the device; returns the device's
    MQTT password and the file name its command carries."""
    password = await instance.add_device(name, 7)
    status, body = await instance.upload("fw", 7, b"firmware")
    assert status == 200, body
    file_name = body["data"]["fileName"]
    status, body = await instance.enable("fw", name)
    assert status == 200, body
    return password, file_name


async def _run(*command: str, timeout: float = 20.0) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, out.decode(), err.decode()


def _client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


async def _raw_connack(port: int, context: ssl.SSLContext, packet: bytes) -> bytes:
    """Open a TLS connection, send ``packet`` (a CONNECT) and return the 4-byte CONNACK."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    try:
        writer.write(packet)
        return await reader.readexactly(4)
    finally:
        writer.close()


# --- configuration ---

def test_tls_keys_have_their_env_names_and_flags():
    result = subprocess.run([sys.executable, "-m", "otad", "check-config", "--help"], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, check=True)
    for flag, env in (("--mqtt-tls-port", "OTAD_MQTT_TLS_PORT"), ("--mqtt-certfile", "OTAD_MQTT_CERTFILE"),
                      ("--mqtt-keyfile", "OTAD_MQTT_KEYFILE"), ("--mqtt-cafile", "OTAD_MQTT_CAFILE"),
                      ("--http-certfile", "OTAD_HTTP_CERTFILE"), ("--http-keyfile", "OTAD_HTTP_KEYFILE"),
                      ("--mqtt-ws-port", "OTAD_MQTT_WS_PORT")):
        assert flag in result.stdout and env in result.stdout, flag
    settings = load_settings({}, {"OTAD_MQTT_TLS_PORT": "8883", "OTAD_MQTT_CERTFILE": "/c.pem",
                                  "OTAD_MQTT_KEYFILE": "/k.pem", "OTAD_MQTT_CAFILE": "/ca.pem",
                                  "OTAD_HTTP_CERTFILE": "/h.pem", "OTAD_HTTP_KEYFILE": "/hk.pem",
                                  "OTAD_MQTT_WS_PORT": "8083"}, {})
    assert (settings.mqtt.tls_port, settings.mqtt.ws_port) == (8883, 8083)
    assert (str(settings.mqtt.certfile), str(settings.mqtt.keyfile), str(settings.mqtt.cafile)) == \
        ("/c.pem", "/k.pem", "/ca.pem")
    assert (str(settings.http.certfile), str(settings.http.keyfile)) == ("/h.pem", "/hk.pem")
    defaults = load_settings({}, {}, {})
    assert (defaults.mqtt.tls_port, defaults.mqtt.ws_port, defaults.http.certfile) == (0, 0, None)


@pytest.mark.parametrize("flags, named", [
    ({"mqtt.tls_port": 8883}, "mqtt.tls_port"),
    ({"mqtt.certfile": "/c.pem"}, "mqtt.keyfile"),
    ({"http.keyfile": "/k.pem"}, "http.certfile"),
    ({"mqtt.certfile": "/c.pem", "mqtt.keyfile": "/k.pem"}, "mqtt.tls_port"),
    ({"mqtt.ws_port": 1883}, "mqtt.ws_port"),
])
def test_incomplete_tls_settings_fail_naming_the_key(flags, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings({}, {}, flags)


def test_client_certificates_are_checked_against_the_configured_ca_only(pki):
    from otad.tls import Certificates

    context = Certificates().server_context("MQTT", pki.server_cert, pki.server_key, pki.ca)
    # Not the system's CAs as well: a publicly issued certificate must not name a device.
    assert [ca["subject"] for ca in context.get_ca_certs()] == [((("commonName", "ca"),),)]
    assert context.verify_mode == ssl.CERT_REQUIRED


# --- MQTT over TLS ---

@needs_mosquitto_sub
async def test_mosquitto_sub_over_tls_receives_the_enabled_command(tmp_path, pki):
    instance = await _tls_otad(tmp_path, pki)
    try:
        password, file_name = await _device_with_command(instance)
        code, out, err = await _run(MOSQUITTO_SUB, "--cafile", str(pki.ca), "-h", "127.0.0.1",
                                    "-p", str(instance.daemon.mqtt_tls_port), "-t", COMMAND_TOPIC.format("dev1"),
                                    "-u", "dev1", "-P", password, "-q", "1", "-C", "1", "-W", "15")
        assert code == 0, err
        assert json.loads(out)["fileName"] == file_name
        # The plain listener still serves beside the TLS one.
        device = MqttDevice(instance.mqtt_port, "dev1", password)
        assert await device.connect() == 0
        await device.close()
    finally:
        await _stop(instance)


@needs_mosquitto_sub
async def test_a_wrong_password_over_tls_is_refused(tmp_path, pki):
    instance = await _tls_otad(tmp_path, pki)
    try:
        await instance.add_device("dev1", 7)
        code, _, _ = await _run(MOSQUITTO_SUB, "--cafile", str(pki.ca), "-h", "127.0.0.1",
                                "-p", str(instance.daemon.mqtt_tls_port), "-t", COMMAND_TOPIC.format("dev1"),
                                "-u", "dev1", "-P", "wrong", "-C", "1", "-W", "10")
        assert code != 0
    finally:
        await _stop(instance)


@needs_mosquitto_sub
async def test_client_certificate_cn_logs_in_as_the_device_without_a_password(tmp_path, pki):
    instance = await _tls_otad(tmp_path, pki, cafile=True)
    try:
        _, file_name = await _device_with_command(instance)
        code, out, err = await _run(MOSQUITTO_SUB, "--cafile", str(pki.ca), "--cert", str(pki.client_cert),
                                    "--key", str(pki.client_key), "-h", "127.0.0.1",
                                    "-p", str(instance.daemon.mqtt_tls_port), "-t", COMMAND_TOPIC.format("dev1"),
                                    "-q", "1", "-C", "1", "-W", "15")
        assert code == 0, err
        assert json.loads(out)["fileName"] == file_name
    finally:
        await _stop(instance)


async def test_client_certificate_must_match_the_username_and_a_registered_device(tmp_path, pki):
    instance = await _tls_otad(tmp_path, pki, cafile=True)
    try:
        await instance.add_device("dev1", 7)
        dev2_password = await instance.add_device("dev2", 7)
        port, context = instance.daemon.mqtt_tls_port, _client_context(pki, pki.client_cert, pki.client_key)
        # Username equal to the CN, no password: accepted.
        assert await _raw_connack(port, context, connect_packet("c1", "dev1")) == b"\x20\x02\x00\x00"
        # Another device's name and even its right password: the certificate says dev1, refused.
        assert await _raw_connack(port, context, connect_packet("c2", "dev2", dev2_password)) == b"\x20\x02\x00\x05"
        status, body = await instance.request("DELETE", "/api/v2/devices", params={"deviceName": "dev1"})
        assert status == 200, body
        # The CN no longer names a registered device.
        assert await _raw_connack(port, context, connect_packet("c3")) == b"\x20\x02\x00\x05"
    finally:
        await _stop(instance)


async def test_without_a_trusted_client_certificate_the_tls_handshake_is_refused(tmp_path, pki):
    instance = await _tls_otad(tmp_path, pki, cafile=True)
    try:
        password = await instance.add_device("dev1", 7)
        port = instance.daemon.mqtt_tls_port
        for context in (_client_context(pki), _client_context(pki, pki.other_client_cert, pki.other_client_key)):
            # TLS 1.3 finishes the client's side of the handshake before the server has checked the
            # certificate; the server's alert then arrives in place of any MQTT byte.
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                await _raw_connack(port, context, connect_packet("c1", "dev1", password))
    finally:
        await _stop(instance)


# --- HTTPS ---

@needs_curl
async def test_curl_reaches_healthz_over_https_with_the_ca(tmp_path, pki):
    instance = await start_otad(make_settings(tmp_path / "data", **{"http.certfile": str(pki.server_cert),
                                                                    "http.keyfile": str(pki.server_key)}))
    try:
        url = f"https://127.0.0.1:{instance.daemon.http_port}/healthz"
        code, out, err = await _run(CURL, "--silent", "--show-error", "--fail", "--cacert", str(pki.ca), url)
        assert code == 0, err
        assert json.loads(out)["status"] == "ok"
        code, _, _ = await _run(CURL, "--silent", url)  # the system's CAs do not know ours
        assert code != 0
    finally:
        await _stop(instance)


async def test_the_dashboards_session_cookie_is_secure_under_https(tmp_path, pki):
    """Over HTTPS the session cookie is never sent back over plain HTTP."""
    instance = await start_otad(make_settings(tmp_path / "data", **{"http.certfile": str(pki.server_cert),
                                                                    "http.keyfile": str(pki.server_key)}))
    await instance.daemon.services.admins.add_user("adam", "adam-pass")
    url = f"https://127.0.0.1:{instance.daemon.http_port}"
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(pki.ca)))
    try:
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(url + "/login") as response:
                page = await response.text()
                assert "Secure" in response.headers["Set-Cookie"]  # the login form's own cookie too
            async with session.post(url + "/login", allow_redirects=False, headers={"Origin": url},
                                    data={"username": "adam", "password": "adam-pass",
                                          "csrf": csrf_of(page)}) as response:
                assert response.status == 303
                cookie = next(c for c in response.headers.getall("Set-Cookie") if c.startswith("otad_session="))
            assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
            async with session.get(url + "/") as response:
                assert response.status == 200 and "<h1>Overview</h1>" in await response.text()
    finally:
        await _stop(instance)


# --- WebSocket ---

class WebSocketDevice(MqttDevice):
    """The paho-mqtt device of the other tests, over its websocket transport."""

    def __init__(self, port: int, username: str, password: str) -> None:
        super().__init__(port, username, password)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{username}-ws",
                                  transport="websockets")
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, flags, rc, p: self._connack.put(rc.value)
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(min_delay=30, max_delay=30)


async def test_paho_over_websocket_subscribes_and_gets_the_command(tmp_path):
    instance = await start_otad(make_settings(tmp_path / "data", **{"mqtt.ws_port": free_port()}))
    try:
        password, file_name = await _device_with_command(instance)
        device = WebSocketDevice(instance.daemon.mqtt_ws_port, "dev1", password)
        assert await device.connect() == 0
        assert await device.subscribe(COMMAND_TOPIC.format("dev1")) == [1]
        message = await device.next_message()
        assert json.loads(message.payload)["fileName"] == file_name
        # Another device's topic stays refused over WebSocket too.
        assert await device.subscribe(COMMAND_TOPIC.format("dev2")) == [0x80]
        await device.close()
        # A wrong password is refused as over TCP (CONNACK 5, reported by paho as 135).
        refused = WebSocketDevice(instance.daemon.mqtt_ws_port, "dev1", "wrong")
        assert await refused.connect() == 135
    finally:
        await _stop(instance)


async def test_websocket_without_the_mqtt_subprotocol_is_closed(tmp_path):
    import aiohttp

    instance = await start_otad(make_settings(tmp_path / "data", **{"mqtt.ws_port": free_port()}))
    try:
        url = f"http://127.0.0.1:{instance.daemon.mqtt_ws_port}/mqtt"
        async with instance.session.ws_connect(url, protocols=("chat",)) as socket:
            message = await socket.receive()
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await _stop(instance)


# --- SIGHUP ---

async def _served_serial(port: int, pki: Pki) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_context(pki),
                                                   server_hostname="localhost")
    try:
        return int(writer.get_extra_info("peercert")["serialNumber"], 16)
    finally:
        writer.close()


async def _serial_becomes(port: int, pki: Pki, serial: int, process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while await _served_serial(port, pki) != serial:
        assert process.poll() is None, "otad serve exited"
        assert loop.time() < deadline, f"certificate serial {serial} not served"
        await asyncio.sleep(0.1)


async def _logged(path: Path, text: str, process) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while text not in path.read_text():
        assert process.poll() is None, "otad serve exited"
        assert loop.time() < deadline, f"{text!r} not logged"
        await asyncio.sleep(0.1)


async def test_sighup_reloads_the_certificates_and_keeps_them_on_a_bad_file(tmp_path, pki):
    live = tmp_path / "tls"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    http_port, mqtt_port, tls_port = free_port(), free_port(), free_port()
    log_path = tmp_path / "otad.log"
    log_file = open(log_path, "w")  # a file, not a pipe: read while the daemon runs
    process = subprocess.Popen(
        [sys.executable, "-m", "otad", "serve", "--data-dir", str(tmp_path / "data"), "--http-host", "127.0.0.1",
         "--http-port", str(http_port), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(mqtt_port),
         "--mqtt-tls-port", str(tls_port), "--mqtt-certfile", str(cert), "--mqtt-keyfile", str(key),
         "--http-certfile", str(cert), "--http-keyfile", str(key)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    try:
        await wait_for_port(tls_port, process)
        await wait_for_port(http_port, process)
        assert await _served_serial(tls_port, pki) == 1
        assert await _served_serial(http_port, pki) == 1

        new_cert, new_key = pki.server_pair(2)
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        process.send_signal(signal.SIGHUP)
        await _serial_becomes(tls_port, pki, 2, process)
        await _serial_becomes(http_port, pki, 2, process)

        cert.write_text("not a certificate\n")
        process.send_signal(signal.SIGHUP)
        await _logged(log_path, "keeping the previous one", process)
        assert process.poll() is None
        assert await _served_serial(tls_port, pki) == 2
        assert await _served_serial(http_port, pki) == 2
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
        log_file.close()
    stderr = log_path.read_text()
    assert process.returncode == 0, stderr
    assert "reloaded the MQTT TLS certificate" in stderr
    assert "reloaded the HTTPS TLS certificate" in stderr
    assert "keeping the previous one" in stderr
