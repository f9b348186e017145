"""The ``otad`` command: the only reader of argv and the environment; maps failures to exit codes."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from otad import __version__, client
from otad.composition import admin_services, data_dir_notice
from otad.config import KEYS, ConfigError, Settings, load_settings, read_toml, redact_url
from otad.errors import OtadError, StartupError
from otad.service.roles import ADMIN, ROLES

# Flags every command takes (admin commands open the same database as serve).
# The mqtt keys: with mqtt.provisioning = mosquitto-dynsec, device add and reset-password push the
# device's account to the broker themselves.
_COMMON_KEYS = ("data_dir", "log_level", "database.url", "mqtt.mode", "mqtt.external_url", "mqtt.provisioning")
role_option = click.option("--role", type=click.Choice(ROLES), default=ADMIN, show_default=True,
                           help="admin changes things; viewer sees everything and changes nothing")


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
@client.client_options
def main() -> None:
    """otad: OTA update daemon with an embedded MQTT broker.

    --server, --token and --json are for the client commands (package, enable, upgrades, devices,
    campaign), given before or after the subcommand."""


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
    for key in KEYS:
        click.echo(f"{key.path} = {_shown(key.path, functools.reduce(getattr, key.path.split('.'), settings))}")
    click.echo("configuration OK")


# Settings whose value check-config does not print, and the fields of a table that hide a secret
# (the xiaozhi boards' [xiaozhi.mqtt] has a password, [xiaozhi.websocket] a token).
_SECRET_KEYS = ("client.token", "mqtt.hook_secret")
_URL_KEYS = ("database.url", "mqtt.external_url")  # shown with the password masked
_SECRET_FIELDS = ("password", "token", "secret", "key")


def _shown(path: str, value: Any) -> str:
    """A setting's value as check-config prints it: TOML-like, secrets masked."""
    if path in _SECRET_KEYS:
        return "(set, not shown)" if value else "(not set)"
    if path in _URL_KEYS:
        return json.dumps(redact_url(value))
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, dict):
        masked = {name: "(not shown)" if any(word in name.lower() for word in _SECRET_FIELDS) else field
                  for name, field in value.items()}
        return json.dumps(masked, ensure_ascii=False)
    return str(value)


def _admin_settings(config_file: Path | None, params: dict[str, Any]) -> Settings:
    """The settings of a local admin command, after saying on stderr which data directory it
    opens (stdout stays for what scripts read)."""
    settings = _load(config_file, params)
    notice = data_dir_notice(settings)
    if not settings.database.url and not settings.database_path.exists():
        notice += " (pass --data-dir or --config, or set OTAD_DATA_DIR, to use the daemon's)"
    click.echo(f"otad: {notice}", err=True)
    return settings


def _with_services(settings: Settings, action) -> Any:
    """Run ``action(services)`` on the data directory's database (the daemon may be running: SQLite WAL)."""
    async def run():
        async with admin_services(settings) as services:
            return await action(services)

    return _run(run())


@main.group()
def token() -> None:
    """Admin API tokens."""


@token.command("create")
@click.argument("name")
@role_option
@common_options
def token_create(name: str, role: str, config_file: Path | None, **params: Any) -> None:
    """Create an API token; the secret is printed once, as the last line of stdout."""
    secret = _with_services(_admin_settings(config_file, params), lambda s: s.admins.create_token(name, role))
    click.echo(f"created {role} token '{name}'; it is shown only now:", err=True)
    click.echo(secret)


@token.command("list")
@common_options
def token_list(config_file: Path | None, **params: Any) -> None:
    """List API tokens and live login tokens (secrets are stored hashed and cannot be shown).

    One line each: name, kind (api or login), role (admin or viewer), the user a login token was
    issued to, creation and expiry (UTC)."""
    from otad.service.admins import login_token_user

    tokens = _with_services(_admin_settings(config_file, params), lambda s: s.admins.list_tokens())
    for record in tokens:
        expires = f"{record.expires_at:%Y-%m-%d %H:%M:%S}" if record.expires_at else "never"
        click.echo(f"{record.name}\t{record.kind}\trole {record.role}\tuser {login_token_user(record) or '-'}"
                   f"\tcreated {record.created_at:%Y-%m-%d %H:%M:%S}\texpires {expires}")


@token.command("revoke")
@click.argument("name")
@common_options
def token_revoke(name: str, config_file: Path | None, **params: Any) -> None:
    """Delete a token (an API token or a login token, by the name `token list` shows); requests
    using it are refused from then on."""
    _with_services(_admin_settings(config_file, params), lambda s: s.admins.revoke_token(name))
    click.echo(f"revoked token '{name}'")


@main.group()
def user() -> None:
    """Admin users (for POST /api/v2/login)."""


@user.command("add")
@click.argument("name")
@click.option("--password", help="the password (prompted for when omitted)")
@role_option
@common_options
def user_add(name: str, password: str | None, role: str, config_file: Path | None, **params: Any) -> None:
    """Add a user who can log in over HTTP and to the dashboard."""
    settings = _admin_settings(config_file, params)
    if password is None:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    _with_services(settings, lambda s: s.admins.add_user(name, password, role))
    click.echo(f"added {role} user '{name}'")


@user.command("list")
@common_options
def user_list(config_file: Path | None, **params: Any) -> None:
    """List users, one a line: name and role, tab-separated."""
    for record in _with_services(_admin_settings(config_file, params), lambda s: s.admins.list_users()):
        click.echo(f"{record.username}\t{record.role}")


@user.command("passwd")
@click.argument("name")
@click.option("--password", help="the new password (prompted for when omitted)")
@common_options
def user_passwd(name: str, password: str | None, config_file: Path | None, **params: Any) -> None:
    """Change a user's password; their login tokens are revoked."""
    settings = _admin_settings(config_file, params)
    if password is None:
        password = click.prompt("New password", hide_input=True, confirmation_prompt=True)
    revoked = _with_services(settings, lambda s: s.admins.change_password(name, password))
    click.echo(f"changed the password of user '{name}'; revoked {revoked} login token(s)")


@user.command("delete")
@click.argument("name")
@common_options
def user_delete(name: str, config_file: Path | None, **params: Any) -> None:
    """Delete a user and revoke their login tokens."""
    revoked = _with_services(_admin_settings(config_file, params), lambda s: s.admins.delete_user(name))
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
    added = _with_services(_admin_settings(config_file, params),
                           lambda s: s.devices.add({"deviceName": name, "productId": product_id}))
    click.echo(f"added device '{name}' (product {added[0].product_id}); MQTT username is the device name, "
               "password shown only now:", err=True)
    click.echo(added[0].password)


@device.command("reset-password")
@click.argument("name", required=False)
@click.option("--all", "every", is_flag=True, help="every registered device")
@common_options
def device_reset_password(name: str | None, every: bool, config_file: Path | None, **params: Any) -> None:
    """Give NAME (or, with --all, every device) a new MQTT password, printed once: one
    `NAME<TAB>password` line each on stdout. The old one stops working. With mqtt.provisioning =
    mosquitto-dynsec the broker's accounts get the new passwords first (this command connects to
    mqtt.external_url itself; no running daemon is needed)."""
    if (name is None) != every:
        raise click.UsageError("give a device NAME or --all (not both)")
    settings = _admin_settings(config_file, params)
    reset = _with_services(settings, lambda s: s.devices.reset_passwords(None if every else [name]))
    for device in reset:
        click.echo(f"{device.name}\t{device.password}")
    click.echo(f"reset the MQTT password of {len(reset)} device(s); shown only now", err=True)


@device.command("activate")
@click.argument("code")
@common_options
def device_activate(code: str, config_file: Path | None, **params: Any) -> None:
    """Accept the xiaozhi board whose screen shows CODE: it becomes a device and gets firmware."""
    accepted = _with_services(_admin_settings(config_file, params), lambda s: s.xiaozhi.accept(code))
    how = "registered as a new device" if accepted.created_device else "bound to the existing device"
    click.echo(f"activated xiaozhi board '{accepted.device.name}' (product {accepted.device.product_id}, "
               f"client {accepted.activation.client_id}): {how}")


@device.command("pending")
@common_options
def device_pending(config_file: Path | None, **params: Any) -> None:
    """List xiaozhi boards waiting for activation. Their codes are not shown: read the code off the
    board's screen, which is what proves the board is yours."""
    for claim in _with_services(_admin_settings(config_file, params), lambda s: s.xiaozhi.pending()):
        existing = "\texisting device" if claim.existing_device else ""
        click.echo(f"{claim.device_name}\tclient {claim.client_id}\tproduct {claim.product_id}"
                   f"\t{claim.board_type or '-'} {claim.app_version or '-'}\tfrom {claim.remote_addr or '-'}"
                   f"\tlast seen {claim.seen_at:%Y-%m-%d %H:%M:%S}{existing}")


@main.group()
def key() -> None:
    """Signing keys of signed commands and passive replies (signing.enabled; docs/signing.md)."""


_key_options = _settings_options(("data_dir", "log_level", "signing.key_dir"))


def _keys(config_file: Path | None, params: dict[str, Any], action) -> Any:
    """Run ``action(keyring)`` on the key directory, after naming it on stderr (stdout stays for
    what scripts read); a failure is one line on stderr and exit 1."""
    from otad.signing_keys import KeyRing

    settings = _load(config_file, params)
    click.echo(f"otad: signing keys in {settings.key_dir.absolute()}", err=True)
    try:
        return action(KeyRing(settings.key_dir))
    except StartupError as exc:
        _fail(str(exc))
    except OtadError as exc:
        _fail(exc.message)


@key.command("create")
@_key_options
def key_create(config_file: Path | None, **params: Any) -> None:
    """Make a new ECDSA P-256 key; it signs from now on (a running daemon picks it up). Earlier
    keys stay valid for devices until `otad key retire`. Prints the new kid on stdout."""
    created, keys = _keys(config_file, params, lambda keys: (keys.create(), keys.list()))
    older = [key.kid for key in keys if key.status == "valid"]
    then = f"; retire {', '.join(older)} once devices hold it (docs/signing.md)" if older else ""
    click.echo(f"created signing key {created.kid}: bake its public key (otad key show {created.kid}) into "
               f"firmware{then}", err=True)
    click.echo(created.kid)


@key.command("show")
@click.argument("kid", required=False)
@click.option("--format", "form", type=click.Choice(("all", "pem", "c", "hex")), default="all", show_default=True,
              help="pem: the public key; c: a C header for firmware; hex: the uncompressed point 04||X||Y")
@_key_options
def key_show(kid: str | None, form: str, config_file: Path | None, **params: Any) -> None:
    """Show the public key KID (default: the signing key) for baking into firmware."""
    from otad.signing_keys import c_source

    shown = _keys(config_file, params, lambda keys: keys.info(kid))
    parts = {"pem": shown.public_pem().rstrip("\n"), "c": c_source(shown).rstrip("\n"), "hex": shown.point_hex()}
    if form != "all":
        click.echo(parts[form])
        return
    click.echo(f"kid: {shown.kid} ({shown.status})\n\n{parts['pem']}\n\n"
               f"uncompressed point (65 bytes, hex):\n{parts['hex']}\n\n{parts['c']}")


@key.command("list")
@_key_options
def key_list(config_file: Path | None, **params: Any) -> None:
    """List the keys, one a line: kid, status (signing; valid: devices still accept it; retired)
    and when its file was made (UTC), tab-separated."""
    for listed in _keys(config_file, params, lambda keys: keys.list()):
        click.echo(f"{listed.kid}\t{listed.status}\tcreated {listed.created_at:%Y-%m-%d %H:%M:%S}")


@key.command("retire")
@click.argument("kid")
@_key_options
def key_retire(kid: str, config_file: Path | None, **params: Any) -> None:
    """Stop listing KID as valid and delete its private key (its public key is kept for the record).
    The signing key cannot be retired: create its successor first."""
    _keys(config_file, params, lambda keys: keys.retire(kid))
    click.echo(f"retired key {kid}")


client.register(main)
