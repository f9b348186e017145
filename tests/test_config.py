"""Configuration: defaults < TOML < OTAD_* environment < flags; bad input names the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from otad.config import ConfigError, load_settings


def test_defaults():
    settings = load_settings({}, {"HOME": "/home/op"}, {})
    assert (settings.http.host, settings.http.port) == ("0.0.0.0", 8080)
    assert (settings.mqtt.host, settings.mqtt.port) == ("0.0.0.0", 1883)
    assert settings.mqtt.allow_anonymous is False
    assert settings.http.max_upload_size == 1024**3
    assert settings.data_dir == Path("/home/op/.local/share/otad")
    assert settings.firmware_dir == Path("/home/op/.local/share/otad/firmware")
    assert settings.api.always_http_200 is False


def test_systemd_state_directory_is_the_default_data_dir():
    assert load_settings({}, {"STATE_DIRECTORY": "/var/lib/otad"}, {}).data_dir == Path("/var/lib/otad")


def test_precedence_flags_over_env_over_file_over_defaults():
    document = {"log_level": "warning", "http": {"port": 9000, "host": "10.0.0.1"}, "mqtt": {"port": 2883}}
    env = {"OTAD_HTTP_PORT": "9100", "OTAD_MQTT_PORT": "3883", "OTAD_ALLOW_ANONYMOUS": "true"}
    flags = {"http.port": "9200", "mqtt.allow_anonymous": False}
    settings = load_settings(document, env, flags)
    assert settings.http.port == 9200           # flag beats env and file
    assert settings.mqtt.port == 3883           # env beats file
    assert settings.http.host == "10.0.0.1"     # file beats default
    assert settings.log_level == "warning"
    assert settings.mqtt.allow_anonymous is False  # an explicit --no-allow-anonymous beats env


@pytest.mark.parametrize("document,env,flags,named", [
    ({"http": {"prot": 1}}, {}, {}, "http.prot"),
    ({"colour": "blue"}, {}, {}, "colour"),
    ({"http": {"port": "eighty"}}, {}, {}, "http.port"),
    ({"http": {"port": 70000}}, {}, {}, "http.port"),
    ({}, {"OTAD_MQTT_PORT": "x"}, {}, "OTAD_MQTT_PORT"),
    ({}, {"OTAD_ALLOW_ANONYMOUS": "maybe"}, {}, "OTAD_ALLOW_ANONYMOUS"),
    ({}, {}, {"http.max_upload_size": "lots"}, "--max-upload-size"),
    ({}, {}, {"public_url": "ftp://x"}, "--public-url"),
    ({}, {}, {"log_level": "chatty"}, "--log-level"),
])
def test_bad_config_names_the_key(document, env, flags, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_settings(document, env, flags)


def test_sizes_accept_units():
    assert load_settings({"http": {"max_upload_size": "200MB"}}, {}, {}).http.max_upload_size == 200_000_000
    assert load_settings({}, {"OTAD_MAX_UPLOAD_SIZE": "1GiB"}, {}).http.max_upload_size == 1024**3
    assert load_settings({}, {}, {"http.max_upload_size": "512M"}).http.max_upload_size == 512 * 1024**2


def test_example_config_is_valid_and_holds_every_default():
    import tomllib

    from otad.config import KEYS

    document = tomllib.loads((Path(__file__).parent.parent / "config.example.toml").read_text())
    settings = load_settings(document, {}, {})
    assert settings.http.port == 8080 and settings.mqtt.port == 1883
    flat = {f"{section}.{key}" for section, table in document.items() if isinstance(table, dict) for key in table}
    flat |= {key for key, value in document.items() if not isinstance(value, dict)}
    # Keys whose default is "unset" (None) appear commented out, as TOML has no null.
    assert {key.path for key in KEYS if key.default is not None} <= flat


def _otad(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "otad", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_check_config_accepts_good_and_rejects_bad_files(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[http]\nport = 8081\n')
    result = _otad("check-config", "--config", str(good), "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "8081" in result.stdout and "configuration OK" in result.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nallow_anonymus = true\n')
    result = _otad("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "mqtt.allow_anonymus" in result.stderr and "Traceback" not in result.stderr
    result = _otad("check-config", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "not found" in result.stderr


def test_the_keys_for_several_nodes_have_their_names_and_are_checked():
    from otad.config import KEYS

    names = {key.path: (key.env, key.flag) for key in KEYS}
    assert names["database.url"] == ("OTAD_DATABASE_URL", "--database-url")
    assert names["mqtt.mode"] == ("OTAD_MQTT_MODE", "--mqtt-mode")
    assert names["mqtt.external_url"] == ("OTAD_MQTT_EXTERNAL_URL", "--mqtt-external-url")
    assert names["mqtt.provisioning"] == ("OTAD_MQTT_PROVISIONING", "--mqtt-provisioning")
    assert names["firmware.url"] == ("OTAD_FIRMWARE_URL", "--firmware-url")
    settings = load_settings({"mqtt": {"mode": "external", "external_url": "mqtt://otad:pw@broker:1883",
                                       "provisioning": "mosquitto-dynsec"}},
                             {"OTAD_DATABASE_URL": "postgres://otad:pw@db:5432/otad"},
                             {"firmware.url": "file:///srv/otad-firmware"})
    assert (settings.mqtt.mode, settings.mqtt.provisioning) == ("external", "mosquitto-dynsec")
    assert settings.database.url == "postgres://otad:pw@db:5432/otad"
    assert str(settings.firmware_dir) == "/srv/otad-firmware"
    defaults = load_settings({}, {}, {})
    assert (defaults.database.url, defaults.mqtt.mode, defaults.firmware.url) == ("", "embedded", "")
    for flags, named in (({"mqtt.mode": "cloud"}, "--mqtt-mode"), ({"database.url": "mysql://db/otad"}, "--database-url"),
                         ({"mqtt.mode": "external"}, "mqtt.external_url"),
                         ({"mqtt.provisioning": "http-hooks"}, "mqtt.provisioning is for mqtt.mode = external")):
        with pytest.raises(ConfigError, match=re.escape(named)):
            load_settings({}, {}, flags)
    # a password in a URL never shows in the error
    with pytest.raises(ConfigError) as refused:
        load_settings({}, {}, {"database.url": "postgres://otad:hunter2@db:notaport/otad"})
    assert "hunter2" not in str(refused.value)
