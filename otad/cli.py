"""The ``otad`` command: the only reader of argv and the environment; maps failures to exit codes."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from otad import __version__
from otad.config import KEYS, ConfigError, Settings, load_settings, read_toml
from otad.errors import OtadError, StartupError

# Flags every command takes (admin commands open the same database as serve).
_COMMON_KEYS = ("data_dir", "log_level")


def _param(path: str) -> str:
    return path.replace(".", "__")


def _settings_options(paths: tuple[str, ...]):
    """click options generated from config.KEYS, so a flag always matches its TOML key and env var."""
    def decorate(command):
        for key in reversed([key for key in KEYS if key.path in paths]):
            if key.parse.__name__ == "_parse_bool":
                negative = "--no-" + key.flag[2:]
                option = click.option(f"{key.flag}/{negative}", _param(key.path), default=None,
                                      help=f"[{key.path}, {key.env}]")
            else:
                option = click.option(key.flag, _param(key.path), default=None, metavar="VALUE",
                                      help=f"[{key.path}, {key.env}] default: {key.default!r}")
            command = option(command)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                            envvar="OTAD_CONFIG", help="TOML config file [OTAD_CONFIG]")(command)
    return decorate


_CLIENT_KEYS = ("client.server", "client.token")
common_options = _settings_options(_COMMON_KEYS)
server_options = _settings_options(tuple(key.path for key in KEYS if key.path not in _CLIENT_KEYS))


def load_client_settings(config_file: Path | None, server: str | None, token: str | None) -> dict[str, str]:
    """Server and token for the client subcommands: flag > OTAD_SERVER/OTAD_TOKEN > config > default."""
    try:
        document = read_toml(config_file) if config_file else {}
        # Only the [client] keys: a daemon setting that is wrong on this machine is no reason for
        # the client to refuse to run.
        client_env = {key.env: os.environ[key.env] for key in KEYS if key.path in _CLIENT_KEYS
                      and key.env in os.environ}
        client_document = {"client": document["client"]} if isinstance(document.get("client"), dict) else {}
        settings = load_settings(client_document, client_env, {"client.server": server, "client.token": token})
    except ConfigError as exc:
        _fail(str(exc), 2)
        raise
    return {"server": settings.client.server, "token": settings.client.token}


def _settings(config_file: Path | None, params: dict[str, Any]) -> Settings:
    flags = {path: params.get(_param(path)) for path in (key.path for key in KEYS)}
    document = read_toml(config_file) if config_file else {}
    return load_settings(document, dict(os.environ), flags)


def _setup_logging(level: str) -> None:
    # Under systemd, journald stamps each line itself.
    under_systemd = "INVOCATION_ID" in os.environ or "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s" if under_systemd else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    if level != "debug":
        logging.getLogger("tortoise").setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"otad: error: {message}", err=True)
    sys.exit(code)


def _run(coro) -> Any:
    """Run an async command; known failures become one line on stderr and a non-zero exit."""
    try:
        return asyncio.run(coro)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except StartupError as exc:
        _fail(str(exc))
    except OtadError as exc:
        _fail(exc.message)


def _load(config_file: Path | None, params: dict[str, Any]) -> Settings:
    try:
        return _settings(config_file, params)
    except ConfigError as exc:
        _fail(str(exc), 2)
        raise  # unreachable: _fail exits


@click.group()
@click.version_option(__version__, prog_name="otad")
def main() -> None:
    """otad: OTA update daemon with an embedded MQTT broker."""


@main.command()
@server_options
def serve(config_file: Path | None, **params: Any) -> None:
    """Run the daemon: MQTT broker and HTTP API in one process."""
    from otad.daemon import serve as serve_daemon

    settings = _load(config_file, params)
    _setup_logging(settings.log_level)
    _run(serve_daemon(settings))


@main.command("check-config")
@server_options
def check_config(config_file: Path | None, **params: Any) -> None:
    """Validate the configuration and print the effective settings, without starting."""
    settings = _load(config_file, params)
    click.echo(f"data_dir = {settings.data_dir}")
    click.echo(f"http = {settings.http.host}:{settings.http.port}, mqtt = {settings.mqtt.host}:{settings.mqtt.port}")
    click.echo(f"allow_anonymous = {settings.mqtt.allow_anonymous}, max_upload_size = {settings.http.max_upload_size}")
    click.echo(f"public_url = {settings.public_url or '(from the request Host header)'}")
    click.echo("configuration OK")


async def _with_services(settings: Settings, action):
    """Open the database (the daemon may be running: SQLite WAL) and run ``action(services)``."""
    from otad.daemon import open_database, prepare_data_dir
    from otad.firmware import FirmwareStore
    from otad.service import build_services

    prepare_data_dir(settings)
    async with open_database(settings):
        # Local admin commands never publish; the daemon restores pending commands when it starts.
        services = build_services(FirmwareStore(settings.firmware_dir), _NoPublisher(), settings.http.max_upload_size)
        return await action(services)


class _NoPublisher:
    async def send_command(self, device_name: str, payload: bytes) -> None:
        raise StartupError("upgrades are enabled through the running daemon's HTTP API")

    async def keep_command(self, device_name: str, payload: bytes) -> None:
        pass

    async def clear_command(self, device_name: str) -> None:
        pass  # the daemon restores only open upgrades at start, so nothing stale is kept

    async def forget_device(self, device_name: str) -> None:
        pass  # a running daemon refuses the deleted device's next login


@main.group()
def token() -> None:
    """Admin API tokens."""


@token.command("create")
@click.argument("name")
@common_options
def token_create(name: str, config_file: Path | None, **params: Any) -> None:
    """Create a token; the secret is printed once, as the last line of stdout."""
    secret = _run(_with_services(_load(config_file, params), lambda s: s.admins.create_token(name)))
    click.echo(f"created token '{name}'; it is shown only now:", err=True)
    click.echo(secret)


@token.command("list")
@common_options
def token_list(config_file: Path | None, **params: Any) -> None:
    """List API tokens and live login tokens (secrets are stored hashed and cannot be shown).

    One line each: name, kind (api or login), the user a login token was issued to, creation and
    expiry (UTC)."""
    from otad.service.admins import login_token_user

    tokens = _run(_with_services(_load(config_file, params), lambda s: s.admins.list_tokens()))
    for record in tokens:
        expires = f"{record.expires_at:%Y-%m-%d %H:%M:%S}" if record.expires_at else "never"
        click.echo(f"{record.name}\t{record.kind}\tuser {login_token_user(record) or '-'}"
                   f"\tcreated {record.created_at:%Y-%m-%d %H:%M:%S}\texpires {expires}")


@token.command("revoke")
@click.argument("name")
@common_options
def token_revoke(name: str, config_file: Path | None, **params: Any) -> None:
    """Delete a token (an API token or a login token, by the name `token list` shows); requests
    using it are refused from then on."""
    _run(_with_services(_load(config_file, params), lambda s: s.admins.revoke_token(name)))
    click.echo(f"revoked token '{name}'")


@main.group()
def user() -> None:
    """Admin users (for POST /api/v2/login)."""


@user.command("add")
@click.argument("name")
@click.option("--password", help="the password (prompted for when omitted)")
@common_options
def user_add(name: str, password: str | None, config_file: Path | None, **params: Any) -> None:
    """Add a user who can log in over HTTP."""
    settings = _load(config_file, params)
    if password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    _run(_with_services(settings, lambda s: s.admins.add_user(name, password)))
    click.echo(f"added user '{name}'")


@user.command("list")
@common_options
def user_list(config_file: Path | None, **params: Any) -> None:
    """List usernames, one a line."""
    for name in _run(_with_services(_load(config_file, params), lambda s: s.admins.list_users())):
        click.echo(name)


@user.command("passwd")
@click.argument("name")
@click.option("--password", help="the new password (prompted for when omitted)")
@common_options
def user_passwd(name: str, password: str | None, config_file: Path | None, **params: Any) -> None:
    """Change a user's password; their login tokens are revoked."""
    settings = _load(config_file, params)
    if password is None:
        password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    revoked = _run(_with_services(settings, lambda s: s.admins.change_password(name, password)))
    click.echo(f"changed the password of user '{name}'; revoked {revoked} login token(s)")


@user.command("delete")
@click.argument("name")
@common_options
def user_delete(name: str, config_file: Path | None, **params: Any) -> None:
    """Delete a user and revoke their login tokens."""
    revoked = _run(_with_services(_load(config_file, params), lambda s: s.admins.delete_user(name)))
    click.echo(f"deleted user '{name}'; revoked {revoked} login token(s)")


@main.group()
def device() -> None:
    """The device registry."""


@device.command("add")
@click.argument("name")
@click.option("--product-id", required=True, help="the device's product id (an integer)")
@common_options
def device_add(name: str, product_id: str, config_file: Path | None, **params: Any) -> None:
    """Register a device; its MQTT password is printed once, as the last line of stdout."""
    added = _run(_with_services(_load(config_file, params),
                                lambda s: s.devices.add({"deviceName": name, "productId": product_id})))
    click.echo(f"added device '{name}' (product {added[0].product_id}); MQTT username is the device name, "
               "password shown only now:", err=True)
    click.echo(added[0].password)


@device.command("activate")
@click.argument("code")
@common_options
def device_activate(code: str, config_file: Path | None, **params: Any) -> None:
    """Accept the xiaozhi board whose screen shows CODE: it becomes a device and gets firmware."""
    accepted = _run(_with_services(_load(config_file, params), lambda s: s.xiaozhi.accept(code)))
    how = "registered as a new device" if accepted.created_device else "bound to the existing device"
    click.echo(f"activated xiaozhi board '{accepted.device.name}' (product {accepted.device.product_id}, "
               f"client {accepted.activation.client_id}): {how}")


@device.command("pending")
@common_options
def device_pending(config_file: Path | None, **params: Any) -> None:
    """List xiaozhi boards waiting for activation. Their codes are not shown: read the code off the
    board's screen, which is what proves the board is yours."""
    for claim in _run(_with_services(_load(config_file, params), lambda s: s.xiaozhi.pending())):
        existing = "\texisting device" if claim.existing_device else ""
        click.echo(f"{claim.device_name}\tclient {claim.client_id}\tproduct {claim.product_id}"
                   f"\t{claim.board_type or '-'} {claim.app_version or '-'}\tfrom {claim.remote_addr or '-'}"
                   f"\tlast seen {claim.seen_at:%Y-%m-%d %H:%M:%S}{existing}")


from otad.client import register as _register_client_commands  # noqa: E402  (needs main defined)

_register_client_commands(main)
