"""Settings: defaults < TOML file < ``OTAD_*`` environment < CLI flags, merged once.

``load_settings`` is pure: it takes the parsed TOML document, an environment mapping and the flags
that were given, and returns a frozen ``Settings`` tree or raises ``ConfigError`` naming the key.
Every key lives in ``KEYS`` exactly once, so the TOML name, the environment variable and the flag
can never drift apart; ``config.example.toml`` documents the same table.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A configuration value is unknown or invalid; the message names the key and where it came from."""


@dataclass(frozen=True)
class HttpSettings:
    host: str
    port: int
    max_upload_size: int
    shutdown_timeout: float
    login_max_failures: int = 10  # failed logins per address or username within login_window
    login_window: float = 300.0  # seconds over which failed logins are counted
    head_timeout: float = 15.0  # seconds for a request head, from its first byte
    body_timeout: float = 60.0  # seconds a request body may go without sending a byte
    keepalive_timeout: float = 30.0  # seconds a keep-alive connection may sit idle between requests
    max_connections: int = 0  # open HTTP connections; 0: a share of the open-file limit
    certfile: Path | None = None  # with keyfile: the API is served over HTTPS
    keyfile: Path | None = None


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    allow_anonymous: bool
    session_expiry_interval: int
    connect_timeout: float
    max_connections: int
    max_packet_size: int
    # Per-device quotas (otad.mqtt.quotas).
    max_retained_per_device: int = 100
    max_retained_bytes_per_device: int = 1024**2
    max_queued_messages: int = 1000
    max_queued_bytes: int = 4 * 1024**2
    max_inflight: int = 20
    max_unreleased_qos2: int = 100
    max_sessions_per_user: int = 10
    # Firmware over MQTT (docs/chunks.md): the largest chunk a device may ask for, and how many of a
    # device's chunk transfers may be in flight at once (over all its connections).
    chunk_max_size: int = 32 * 1024
    chunk_transfers_per_device: int = 2
    tls_port: int = 0  # MQTT over TLS; 0: off
    certfile: Path | None = None
    keyfile: Path | None = None
    cafile: Path | None = None  # set: the TLS port requires client certificates signed by it
    ws_port: int = 0  # MQTT over WebSocket (subprotocol mqtt); 0: off
    mode: str = "embedded"  # MQTT_MODES: otad's own broker, or a client of an external one
    external_url: str = ""  # mqtt(s)://user:pass@host:port: otad's own account on the external broker
    provisioning: str = "none"  # PROVISIONING_KINDS: how devices get credentials on the external broker
    hook_secret: str = ""  # http-hooks: the header EMQX sends; "": the hooks answer 127.0.0.1 only


# mqtt.mode and mqtt.provisioning (issue 13).
MQTT_MODES = ("embedded", "external")
PROVISIONING_KINDS = ("mosquitto-dynsec", "http-hooks", "none")


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = ""  # "": SQLite in the data directory; postgres://user:pass@host:port/db: PostgreSQL


@dataclass(frozen=True)
class FirmwareSettings:
    url: str = ""  # "": <data_dir>/firmware; file:///path (a shared mount); s3://bucket/prefix
    s3_endpoint: str = ""  # the S3-compatible server; "": AWS_ENDPOINT_URL, else AWS itself
    auto_delta: bool = False  # an upload builds delta patches from the product's earlier packages (docs/delta.md)


@dataclass(frozen=True)
class SigningSettings:
    enabled: bool = False  # commands and passive replies carry kid and sig (docs/signing.md)
    key_dir: Path | None = None  # None: <data_dir>/keys; a shared mount for several nodes
    reply_lifetime: float = 3600.0  # seconds a signed passive reply stays valid (its "expires")
    key_recheck: float = 5.0  # seconds between re-reads of key_dir (a new `otad key create` key), off the loop


@dataclass(frozen=True)
class ApiSettings:
    always_http_200: bool


@dataclass(frozen=True)
class UpgradeSettings:
    timeout: float  # seconds an upgrade may take before it is timed_out
    timeline_limit: int = 100  # timeline entries kept per upgrade besides its state changes


@dataclass(frozen=True)
class ClientSettings:
    server: str
    token: str


@dataclass(frozen=True)
class XiaozhiSettings:
    default_product_id: int | None  # where unknown boards are registered; None: answer without upgrade
    timezone_offset: int | None  # minutes east of UTC in server_time; None: the host's offset
    websocket: dict[str, Any] | None  # passed through to boards as given, only when configured
    mqtt: dict[str, Any] | None


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    log_level: str
    public_url: str
    http: HttpSettings
    mqtt: MqttSettings
    api: ApiSettings
    upgrade: UpgradeSettings
    xiaozhi: XiaozhiSettings
    client: ClientSettings
    database: DatabaseSettings = DatabaseSettings()
    firmware: FirmwareSettings = FirmwareSettings()
    signing: SigningSettings = SigningSettings()

    @property
    def firmware_dir(self) -> Path:
        """Where firmware files live on this machine: the data dir's, or a file:// mount's."""
        if self.firmware.url.startswith("file://"):
            return Path(urlsplit(self.firmware.url).path)
        return self.data_dir / "firmware"

    @property
    def key_dir(self) -> Path:
        """Where the signing keys live (otad.signing_keys)."""
        return self.signing.key_dir or self.data_dir / "keys"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "otad.sqlite3"


# --- value parsers: each takes the raw value (TOML-typed or a string) and returns the typed value ---

def _parse_port(raw: Any) -> int:
    value = _parse_int(raw)
    if not 1 <= value <= 65535:
        raise ValueError(f"must be a port between 1 and 65535 (got {raw!r})")
    return value


def _parse_optional_port(raw: Any) -> int:
    """A port, or 0 for a listener that is off."""
    value = _parse_int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be a port between 1 and 65535, or 0 for off (got {raw!r})")
    return value


def _parse_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise ValueError(f"must be an integer (got {raw!r})")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        return int(raw)
    raise ValueError(f"must be an integer (got {raw!r})")


def _parse_count(raw: Any) -> int:
    value = _parse_int(raw)
    if value < 0:
        raise ValueError(f"must be 0 or more (got {raw!r})")
    return value


def _parse_positive_int(raw: Any) -> int:
    value = _parse_int(raw)
    if value <= 0:
        raise ValueError(f"must be a positive integer (got {raw!r})")
    return value


def _parse_positive_float(raw: Any) -> float:
    try:
        value = float(raw) if not isinstance(raw, bool) else None
    except (TypeError, ValueError):
        value = None
    if value is None or value <= 0:
        raise ValueError(f"must be a positive number of seconds (got {raw!r})")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError(f"must be true or false (got {raw!r})")


_SIZE_UNITS = {"": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def _parse_size(raw: Any) -> int:
    """Bytes as an integer, or a string such as ``"200MB"``, ``"1GiB"`` or ``"512M"``."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(raw))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ValueError(f"must be a size in bytes such as 1073741824, '200MB' or '1GiB' (got {raw!r})")
        value = int(match.group(1)) * _SIZE_UNITS[unit]
    if value <= 0:
        raise ValueError(f"must be a positive size (got {raw!r})")
    return value


def _parse_reply_lifetime(raw: Any) -> float:
    """Seconds; at least two minutes, since a reply is rebuilt (and signed again) in its last minute."""
    value = _parse_positive_float(raw)
    if value < 120:
        raise ValueError(f"must be at least 120 seconds (got {raw!r})")
    return value


_LOG_LEVELS = ("debug", "info", "warning", "error")


def _parse_log_level(raw: Any) -> str:
    value = str(raw).strip().lower()
    if value not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)} (got {raw!r})")
    return value


def _parse_public_url(raw: Any) -> str:
    value = str(raw).strip().rstrip("/")
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"must be an http(s) base URL such as http://gateway.local:8080 (got {raw!r})")
    return value


def _parse_url_of(schemes: tuple[str, ...], example: str) -> Callable[[Any], str]:
    """A parser of "" (off) or a URL of one of ``schemes`` with a host (or, for file:, a path)."""
    def parse(raw: Any) -> str:
        value = str(raw).strip()
        if not value:
            return ""
        parts = urlsplit(value)
        if parts.scheme not in schemes or (parts.scheme == "file" and not parts.path) or \
                (parts.scheme != "file" and not parts.hostname):
            raise ValueError(f"must be empty or a URL such as {example} (got {_redacted(value)!r})")
        if parts.scheme != "file":
            try:
                parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
            except ValueError:
                raise ValueError(f"has a bad port (got {_redacted(value)!r})") from None
        return value
    parse.__name__ = f"_parse_{schemes[0]}_url"
    return parse


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def redact_url(url: str) -> str:
    """``url`` with its password masked (``postgres://otad:***@db/otad``)."""
    return _redacted(url)


def _parse_choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        value = str(raw).strip().lower()
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)} (got {raw!r})")
        return value
    parse.__name__ = "_parse_choice"
    return parse


def _parse_optional_product_id(raw: Any) -> int | None:
    if raw == "" or raw is None:
        return None
    value = _parse_int(raw)
    if value < 0:
        raise ValueError(f"must be a non-negative product id (got {raw!r})")
    return value


def _parse_minutes_offset(raw: Any) -> int | None:
    if raw == "" or raw is None:
        return None
    value = _parse_int(raw)
    if not -14 * 60 <= value <= 14 * 60:
        raise ValueError(f"must be minutes east of UTC between -840 and 840 (got {raw!r})")
    return value


def _parse_table(raw: Any) -> dict[str, Any] | None:
    """A TOML table, or a JSON object when given in the environment or on the command line."""
    if isinstance(raw, str):
        if not raw.strip():
            return None
        try:
            raw = json.loads(raw)
        except ValueError:
            raise ValueError(f"must be a table (a JSON object in the environment or a flag), got {raw!r}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"must be a table (got {raw!r})")
    return dict(raw) or None


def _parse_host(raw: Any) -> str:
    value = str(raw).strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def _parse_path(raw: Any) -> Path:
    value = str(raw).strip()
    if not value:
        raise ValueError("must not be empty")
    return Path(value).expanduser()


def default_data_dir(env: Mapping[str, str]) -> Path:
    """systemd's ``StateDirectory=`` when run as a unit, else the user's XDG data dir."""
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME", "~")) / ".local" / "share")
    return Path(base).expanduser() / "otad"


@dataclass(frozen=True)
class Key:
    """One setting: its TOML path (``section.name``), its parser and default."""

    path: str
    parse: Callable[[Any], Any]
    default: Any
    # Whether the env var and flag carry the section name: http.host and mqtt.host would both be
    # OTAD_HOST otherwise, and a bare OTAD_MQTT would not say it is the xiaozhi boards' setting.
    qualified: bool = False

    @property
    def _public_name(self) -> str:
        section, _, name = self.path.rpartition(".")
        return f"{section}_{name}" if self.qualified else name

    @property
    def env(self) -> str:
        return "OTAD_" + self._public_name.upper()

    @property
    def flag(self) -> str:
        return "--" + self._public_name.replace("_", "-")


# The defaults here are the documented ones; config.example.toml repeats them with a reason each.
KEYS: tuple[Key, ...] = (
    Key("data_dir", _parse_path, None),  # None: default_data_dir(env)
    Key("log_level", _parse_log_level, "info"),
    Key("public_url", _parse_public_url, ""),
    Key("http.host", _parse_host, "0.0.0.0", qualified=True),
    Key("http.port", _parse_port, 8080, qualified=True),
    Key("http.max_upload_size", _parse_size, 1024**3),
    Key("http.shutdown_timeout", _parse_positive_float, 10.0),
    Key("http.login_max_failures", _parse_positive_int, 10),
    Key("http.login_window", _parse_positive_float, 300.0),
    Key("http.head_timeout", _parse_positive_float, 15.0),
    Key("http.body_timeout", _parse_positive_float, 60.0),
    Key("http.keepalive_timeout", _parse_positive_float, 30.0),
    Key("http.max_connections", _parse_count, 0, qualified=True),
    Key("http.certfile", _parse_path, None, qualified=True),
    Key("http.keyfile", _parse_path, None, qualified=True),
    Key("mqtt.host", _parse_host, "0.0.0.0", qualified=True),
    Key("mqtt.port", _parse_port, 1883, qualified=True),
    Key("mqtt.allow_anonymous", _parse_bool, False),
    Key("mqtt.session_expiry_interval", _parse_positive_int, 7 * 24 * 3600),
    Key("mqtt.connect_timeout", _parse_positive_float, 10.0),
    Key("mqtt.max_connections", _parse_positive_int, 20_000),
    Key("mqtt.max_packet_size", _parse_size, 1024**2),
    Key("mqtt.max_retained_per_device", _parse_positive_int, 100),
    Key("mqtt.max_retained_bytes_per_device", _parse_size, 1024**2),
    Key("mqtt.max_queued_messages", _parse_positive_int, 1000),
    Key("mqtt.max_queued_bytes", _parse_size, 4 * 1024**2),
    Key("mqtt.max_inflight", _parse_positive_int, 20),
    Key("mqtt.max_unreleased_qos2", _parse_positive_int, 100),
    Key("mqtt.max_sessions_per_user", _parse_positive_int, 10),
    Key("mqtt.chunk_max_size", _parse_size, 32 * 1024),
    Key("mqtt.chunk_transfers_per_device", _parse_positive_int, 2),
    Key("mqtt.tls_port", _parse_optional_port, 0, qualified=True),
    Key("mqtt.certfile", _parse_path, None, qualified=True),
    Key("mqtt.keyfile", _parse_path, None, qualified=True),
    Key("mqtt.cafile", _parse_path, None, qualified=True),
    Key("mqtt.ws_port", _parse_optional_port, 0, qualified=True),
    Key("mqtt.mode", _parse_choice(MQTT_MODES), "embedded", qualified=True),
    Key("mqtt.external_url", _parse_url_of(("mqtt", "mqtts"), "mqtt://otad:secret@broker:1883"), "", qualified=True),
    Key("mqtt.provisioning", _parse_choice(PROVISIONING_KINDS), "none", qualified=True),
    Key("mqtt.hook_secret", lambda raw: str(raw).strip(), "", qualified=True),
    Key("database.url", _parse_url_of(("postgres", "postgresql"), "postgres://otad:secret@db:5432/otad"), "",
        qualified=True),
    Key("firmware.url", _parse_url_of(("file", "s3"), "file:///srv/otad-firmware or s3://bucket/prefix"), "",
        qualified=True),
    Key("firmware.s3_endpoint", _parse_public_url, "", qualified=True),
    Key("firmware.auto_delta", _parse_bool, False, qualified=True),
    Key("signing.enabled", _parse_bool, False, qualified=True),
    Key("signing.key_dir", _parse_path, None, qualified=True),
    Key("signing.reply_lifetime", _parse_reply_lifetime, 3600.0, qualified=True),
    Key("signing.key_recheck", _parse_positive_float, 5.0, qualified=True),
    Key("api.always_http_200", _parse_bool, False),
    Key("upgrade.timeout", _parse_positive_float, 24 * 3600.0, qualified=True),
    Key("upgrade.timeline_limit", _parse_positive_int, 100, qualified=True),
    # For the client subcommands (otad package, enable, upgrades, ...), not the daemon.
    Key("client.server", _parse_public_url, "http://127.0.0.1:8080"),
    Key("client.token", str, ""),
    Key("xiaozhi.default_product_id", _parse_optional_product_id, None, qualified=True),
    Key("xiaozhi.timezone_offset", _parse_minutes_offset, None, qualified=True),
    Key("xiaozhi.websocket", _parse_table, None, qualified=True),
    Key("xiaozhi.mqtt", _parse_table, None, qualified=True),
)
_KEYS_BY_PATH = {key.path: key for key in KEYS}


ENV_NAMES = {key.path: key.env for key in KEYS}
FLAG_NAMES = {key.path: key.flag for key in KEYS}


def _flatten_toml(document: Mapping[str, Any]) -> dict[str, Any]:
    """``{"http": {"port": 1}}`` -> ``{"http.port": 1}``; unknown keys raise ConfigError."""
    flat: dict[str, Any] = {}
    for name, value in document.items():
        if isinstance(value, dict):
            for sub_name, sub_value in value.items():
                path = f"{name}.{sub_name}"
                if path not in _KEYS_BY_PATH:
                    raise ConfigError(f"config file: unknown key '{path}'")
                flat[path] = sub_value
        elif name in _KEYS_BY_PATH:
            flat[name] = value
        else:
            raise ConfigError(f"config file: unknown key '{name}'")
    return flat


def read_toml(path: Path) -> dict[str, Any]:
    """Parse the TOML config file; an unreadable or malformed file raises ConfigError."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None


def _check_tls(values: Mapping[str, Any]) -> None:
    """Certificate and key come as a pair, and the MQTT TLS port needs them (and they it)."""
    for section in ("http", "mqtt"):
        certfile, keyfile = values[f"{section}.certfile"], values[f"{section}.keyfile"]
        if (certfile is None) != (keyfile is None):
            missing = f"{section}.keyfile" if keyfile is None else f"{section}.certfile"
            raise ConfigError(f"{missing} must be set too: {section}.certfile and {section}.keyfile go together")
    has_certificate = values["mqtt.certfile"] is not None
    if values["mqtt.tls_port"] and not has_certificate:
        raise ConfigError("mqtt.tls_port needs mqtt.certfile and mqtt.keyfile")
    if (has_certificate or values["mqtt.cafile"] is not None) and not values["mqtt.tls_port"]:
        raise ConfigError("mqtt.certfile, mqtt.keyfile and mqtt.cafile are for mqtt.tls_port, which is 0 (off)")
    if values["mqtt.cafile"] is not None and not has_certificate:
        raise ConfigError("mqtt.cafile needs mqtt.certfile and mqtt.keyfile")
    ports = [values[f"mqtt.{name}"] for name in ("port", "tls_port", "ws_port") if values[f"mqtt.{name}"]]
    if len(set(ports)) != len(ports):
        raise ConfigError("mqtt.port, mqtt.tls_port and mqtt.ws_port must differ")


def _check_external_broker(values: Mapping[str, Any]) -> None:
    """External mode needs otad's account on the broker; provisioning is for external mode."""
    if values["mqtt.mode"] == "external" and not values["mqtt.external_url"]:
        raise ConfigError("mqtt.mode = external needs mqtt.external_url (mqtt://user:pass@host:port)")
    if values["mqtt.mode"] == "embedded" and values["mqtt.provisioning"] != "none":
        raise ConfigError("mqtt.provisioning is for mqtt.mode = external; the embedded broker checks devices itself")


# Room a chunk response needs beside the chunk's bytes: its topic and the frame's JSON header.
CHUNK_FRAME_OVERHEAD = 1024


def _check_chunks(values: Mapping[str, Any]) -> None:
    """A chunk's packet must fit the largest packet the embedded broker takes (and a device
    expects). In external mode mqtt.max_packet_size is not used: the broker's own limit
    (mosquitto's message_size_limit, EMQX's max_packet_size) applies, and docs/chunks.md says so."""
    if values["mqtt.mode"] == "embedded" \
            and values["mqtt.chunk_max_size"] + CHUNK_FRAME_OVERHEAD > values["mqtt.max_packet_size"]:
        raise ConfigError(f"mqtt.chunk_max_size ({values['mqtt.chunk_max_size']}) must leave "
                          f"{CHUNK_FRAME_OVERHEAD} bytes for the frame within mqtt.max_packet_size "
                          f"({values['mqtt.max_packet_size']})")


def load_settings(
    document: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults, the TOML document, ``OTAD_*`` variables and flags (keyed by TOML path)."""
    env = dict(os.environ) if env is None else env
    from_file = _flatten_toml(document or {})
    values: dict[str, Any] = {}
    for key in KEYS:
        sources = (
            (f"{FLAG_NAMES[key.path]}", (flags or {}).get(key.path)),
            (f"environment {ENV_NAMES[key.path]}", env.get(ENV_NAMES[key.path])),
            (f"config file key '{key.path}'", from_file.get(key.path)),
        )
        origin, raw = next(((o, r) for o, r in sources if r is not None), ("default", key.default))
        if raw is None:
            values[key.path] = None
            continue
        try:
            values[key.path] = key.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    data_dir = values["data_dir"] or default_data_dir(env)
    _check_tls(values)
    _check_external_broker(values)
    _check_chunks(values)
    return Settings(
        data_dir=data_dir,
        log_level=values["log_level"],
        public_url=values["public_url"],
        http=HttpSettings(
            host=values["http.host"],
            port=values["http.port"],
            max_upload_size=values["http.max_upload_size"],
            shutdown_timeout=values["http.shutdown_timeout"],
            login_max_failures=values["http.login_max_failures"],
            login_window=values["http.login_window"],
            head_timeout=values["http.head_timeout"],
            body_timeout=values["http.body_timeout"],
            keepalive_timeout=values["http.keepalive_timeout"],
            max_connections=values["http.max_connections"],
            certfile=values["http.certfile"],
            keyfile=values["http.keyfile"],
        ),
        mqtt=MqttSettings(
            host=values["mqtt.host"],
            port=values["mqtt.port"],
            allow_anonymous=values["mqtt.allow_anonymous"],
            session_expiry_interval=values["mqtt.session_expiry_interval"],
            connect_timeout=values["mqtt.connect_timeout"],
            max_connections=values["mqtt.max_connections"],
            max_packet_size=values["mqtt.max_packet_size"],
            max_retained_per_device=values["mqtt.max_retained_per_device"],
            max_retained_bytes_per_device=values["mqtt.max_retained_bytes_per_device"],
            max_queued_messages=values["mqtt.max_queued_messages"],
            max_queued_bytes=values["mqtt.max_queued_bytes"],
            max_inflight=values["mqtt.max_inflight"],
            max_unreleased_qos2=values["mqtt.max_unreleased_qos2"],
            max_sessions_per_user=values["mqtt.max_sessions_per_user"],
            chunk_max_size=values["mqtt.chunk_max_size"],
            chunk_transfers_per_device=values["mqtt.chunk_transfers_per_device"],
            tls_port=values["mqtt.tls_port"],
            certfile=values["mqtt.certfile"],
            keyfile=values["mqtt.keyfile"],
            cafile=values["mqtt.cafile"],
            ws_port=values["mqtt.ws_port"],
            mode=values["mqtt.mode"],
            external_url=values["mqtt.external_url"],
            provisioning=values["mqtt.provisioning"],
            hook_secret=values["mqtt.hook_secret"],
        ),
        database=DatabaseSettings(url=values["database.url"]),
        firmware=FirmwareSettings(url=values["firmware.url"], s3_endpoint=values["firmware.s3_endpoint"],
                                  auto_delta=values["firmware.auto_delta"]),
        signing=SigningSettings(enabled=values["signing.enabled"], key_dir=values["signing.key_dir"],
                                reply_lifetime=values["signing.reply_lifetime"],
                                key_recheck=values["signing.key_recheck"]),
        api=ApiSettings(always_http_200=values["api.always_http_200"]),
        upgrade=UpgradeSettings(timeout=values["upgrade.timeout"], timeline_limit=values["upgrade.timeline_limit"]),
        xiaozhi=XiaozhiSettings(
            default_product_id=values["xiaozhi.default_product_id"],
            timezone_offset=values["xiaozhi.timezone_offset"],
            websocket=values["xiaozhi.websocket"],
            mqtt=values["xiaozhi.mqtt"],
        ),
        client=ClientSettings(server=values["client.server"] or "http://127.0.0.1:8080",
                              token=values["client.token"]),
    )


def load_client_settings(config_file: Path | None, env: Mapping[str, str], server: str | None = None,
                         token: str | None = None) -> ClientSettings:
    """Server and token of the client subcommands: flag > OTAD_SERVER/OTAD_TOKEN > the config
    file's ``[client]`` > default. Only the ``[client]`` keys are read: a daemon setting that is
    wrong on this machine is no reason for the client to refuse to run."""
    document = read_toml(config_file) if config_file else {}
    client_env = {key.env: env[key.env] for key in KEYS if key.path.startswith("client.") and key.env in env}
    client_document = {"client": document["client"]} if isinstance(document.get("client"), dict) else {}
    return load_settings(client_document, client_env, {"client.server": server, "client.token": token}).client
