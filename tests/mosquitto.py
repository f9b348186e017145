"""A real mosquitto 2 for the tests: Debian's /usr/sbin/mosquitto with its dynamic-security plugin,
configured in a temp dir, listening on 127.0.0.1 and a free port, persistence on (a restart keeps
otad's session, its queued reports and the retained commands). Stopped by its PID.

Two accounts: ``admin`` (the dynsec admin role ``mosquitto_ctrl dynsec init`` creates) and
``otad`` (that role plus ``otad.mqtt.dynsec.OTAD_ACCOUNT_ACLS``), the account otad's
mqtt.external_url names. Devices get theirs from otad (mqtt.provisioning = mosquitto-dynsec).

Missing mosquitto: a skip with the reason locally, a failure when ``CI=true`` (CI installs it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from otad.mqtt.dynsec import OTAD_ACCOUNT_ACLS
from tests.conftest import free_port

MOSQUITTO = Path("/usr/sbin/mosquitto")
PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
START_TIMEOUT = 10.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str):
    if _in_ci():
        pytest.fail(f"CI=true and {reason}: the external-broker tests cannot run", pytrace=False)
    pytest.skip(reason)


def dynsec_client(username: str, password: str, roles: list[str]) -> dict:
    """A dynsec client entry as the plugin stores it: PBKDF2-SHA512 over the base64-decoded salt."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {"username": username, "password": base64.b64encode(digest).decode(),
            "salt": base64.b64encode(salt).decode(), "iterations": 101,
            "roles": [{"rolename": role} for role in roles]}


_ADMIN_ACLS = [{"acltype": kind, "topic": topic, "allow": True} for kind, topic in (
    ("publishClientSend", "$CONTROL/dynamic-security/#"), ("publishClientReceive", "$CONTROL/dynamic-security/#"),
    ("subscribePattern", "$CONTROL/dynamic-security/#"), ("publishClientReceive", "$SYS/#"),
    ("subscribePattern", "$SYS/#"), ("publishClientReceive", "#"), ("subscribePattern", "#"),
    ("unsubscribePattern", "#"))]


class Mosquitto:
    """One throwaway broker; ``start()`` returns when it accepts connections."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="otad-mosquitto-"))
        self.port = free_port()
        self.admin_password = secrets.token_urlsafe(12)
        self.otad_password = secrets.token_urlsafe(12)
        self.dynsec_file = self.root / "dynamic-security.json"
        self.log = self.root / "mosquitto.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """otad's mqtt.external_url."""
        return f"mqtt://otad:{self.otad_password}@127.0.0.1:{self.port}"

    def prepare(self) -> None:
        (self.root / "persistence").mkdir()
        self._init_dynsec()
        (self.root / "mosquitto.conf").write_text(
            f"per_listener_settings false\n"
            f"user root\n"  # stay as the tests' user: the temp dir is theirs
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous false\n"
            f"plugin {PLUGIN}\n"
            f"plugin_opt_config_file {self.dynsec_file}\n"
            f"persistence true\n"
            f"persistence_location {self.root / 'persistence'}/\n"
            f"log_dest file {self.log}\n"
            f"log_type all\n")

    def _init_dynsec(self) -> None:
        ctrl = shutil.which("mosquitto_ctrl")
        if ctrl:
            subprocess.run([ctrl, "dynsec", "init", str(self.dynsec_file), "admin", self.admin_password],
                           check=True, capture_output=True, timeout=30)
            config = json.loads(self.dynsec_file.read_text())
        else:  # what `mosquitto_ctrl dynsec init` writes
            config = {"clients": [dynsec_client("admin", self.admin_password, ["admin"])],
                      "roles": [{"rolename": "admin", "acls": _ADMIN_ACLS}],
                      "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                                           "subscribe": False, "unsubscribe": True}}
        config["clients"].append(dynsec_client("otad", self.otad_password, ["admin", "otad"]))
        config["roles"].append({"rolename": "otad", "acls": OTAD_ACCOUNT_ACLS})
        self.dynsec_file.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        self.process = subprocess.Popen([str(MOSQUITTO), "-c", str(self.root / "mosquitto.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: "
                                   f"{self.process.stderr.read().decode(errors='replace')}{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not listen within {START_TIMEOUT} s: {self.log_text()}")
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (mosquitto writes its persistence file), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        self.process.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def mosquitto():
    """A running mosquitto with dynsec, stopped (by PID) and removed after the test."""
    if not MOSQUITTO.exists() or not PLUGIN.exists():
        _unavailable(f"{MOSQUITTO} or its dynamic-security plugin is not installed (apt-get install mosquitto)")
    broker = Mosquitto()
    try:
        broker.prepare()
        broker.start()
        yield broker
    finally:
        broker.cleanup()
