"""``otad`` subcommands that drive a running daemon over its HTTP API, from the gateway or a laptop.

Server and token come from ``--server``/``--token``, ``OTAD_SERVER``/``OTAD_TOKEN`` or the config file's
``[client]`` section. Tables for people by default, ``--json`` for scripts; a failure prints the
envelope's message with the English meaning of its code and exits 1.

A leaf of the command tree: ``otad.cli`` registers these commands; nothing here imports it back.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import click

from otad import errors
from otad.config import ConfigError, load_client_settings

_CHUNK = 256 * 1024

# The contract's errorMsg is Chinese (otad.errors holds it, per code); what each code means.
_MEANINGS = {
    errors.OtadError: "failed",
    errors.InvalidInput: "invalid parameter",
    errors.WrongType: "wrong parameter type",
    errors.MissingInput: "missing parameter",
    errors.NotLoggedIn: "not logged in",
    errors.WrongPassword: "wrong password",
    errors.NoSuchAccount: "no such account",
    errors.Forbidden: "not allowed: your role cannot do this",
    errors.StillReferenced: "still in use, cannot delete",
}
_BY_CODE = {error.code: (error.default_message, meaning) for error, meaning in _MEANINGS.items()}


class ApiError(Exception):
    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def describe_failure(message: str | None, code: object, status: int) -> str:
    """The envelope's errorMsg with the English meaning of its code beside the Chinese, once:
    ``参数无效 (invalid parameter): no device named 'x' (errorCode 1001, HTTP 404)``."""
    chinese, meaning = _BY_CODE.get(code, (None, None)) if isinstance(code, int) else (None, None)
    text = message or chinese or "failed"
    if meaning and chinese and text.startswith(chinese):
        text = f"{chinese} ({meaning}){text[len(chinese):]}"
    elif meaning:
        text = f"{text} ({meaning})"
    return f"{text} (errorCode {code}, HTTP {status})"


def _token_hint(token_given: bool) -> str:
    problem = "the token was refused (wrong, revoked or expired)" if token_given else "no token was given"
    return (f"{problem}: pass one with --token TOKEN, the OTAD_TOKEN environment variable or `token` in the "
            "config file's [client] section; `otad token create NAME` on the daemon's host makes one")


class ApiClient:
    def __init__(self, server: str, token: str | None) -> None:
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, **kwargs) -> Any:
        # No total limit (a large upload on a slow link takes as long as it takes), but a server
        # that stops answering is given up on.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
        try:
            async with aiohttp.ClientSession(headers=self.headers, timeout=timeout) as session:
                async with session.request(method, self.server + path, **kwargs) as response:
                    try:
                        body = await response.json(content_type=None)
                    except (ValueError, aiohttp.ContentTypeError):
                        raise ApiError(f"HTTP {response.status} from {self.server}: not an otad reply") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ApiError(f"cannot reach {self.server}: {exc or type(exc).__name__}") from None
        if not isinstance(body, dict) or not body.get("success"):
            message = body.get("errorMsg") if isinstance(body, dict) else None
            code = body.get("errorCode") if isinstance(body, dict) else None
            hint = _token_hint(bool(self.headers)) if code == errors.NotLoggedIn.code else None
            raise ApiError(describe_failure(message, code, response.status), hint)
        return body.get("data")


def _client(ctx: click.Context) -> ApiClient:
    settings = ctx.obj["settings"]()
    return ApiClient(settings["server"], settings["token"])


def _run(ctx: click.Context, coro) -> Any:
    try:
        return asyncio.run(coro)
    except ApiError as exc:
        click.echo(f"otad: error: {exc}", err=True)
        if exc.hint:
            click.echo(f"otad: {exc.hint}", err=True)
        sys.exit(1)


def _emit(ctx: click.Context, data: Any, columns: list[tuple[str, str]] | None = None) -> None:
    """JSON for scripts, else a plain table (or key: value lines for one object)."""
    if ctx.obj["json"]:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    if isinstance(data, dict) and columns is None:
        for key, value in data.items():
            click.echo(f"{key}: {json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else value}")
        return
    rows = data if isinstance(data, list) else [data]
    columns = columns or [(key, key) for key in (rows[0] if rows else {})]
    cells = [[str(row.get(key, "")) if row.get(key) is not None else "-" for key, _ in columns] for row in rows]
    widths = [max([len(title)] + [len(line[i]) for line in cells]) for i, (_, title) in enumerate(columns)]
    click.echo("  ".join(title.ljust(width) for (_, title), width in zip(columns, widths)).rstrip())
    for line in cells:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


_PACKAGE_COLUMNS = [("id", "ID"), ("name", "NAME"), ("productId", "PRODUCT"), ("version", "VERSION"),
                    ("size", "SIZE"), ("md5", "MD5"), ("createdAt", "CREATED")]
_UPGRADE_COLUMNS = [("version", "UPGRADE"), ("deviceName", "DEVICE"), ("state", "STATE"), ("progress", "%"),
                    ("campaign", "CAMPAIGN"), ("updatedAt", "UPDATED")]
_DEVICE_COLUMNS = [("deviceName", "DEVICE"), ("productId", "PRODUCT"), ("online", "ONLINE"),
                   ("firmwareVersion", "FIRMWARE"), ("lastSeen", "LAST SEEN")]
_CAMPAIGN_COLUMNS = [("id", "ID"), ("name", "PACKAGE"), ("productId", "PRODUCT"), ("state", "STATE"),
                     ("currentStage", "STAGE"), ("stages", "STAGES"), ("reason", "REASON")]


def _with_client_options(function):
    function = click.option("--json", "as_json", is_flag=True, help="print the reply's data as JSON")(function)
    function = click.option("--token", help="admin API token [OTAD_TOKEN, config client.token]")(function)
    return click.option("--server", help="daemon URL [OTAD_SERVER, config client.server]")(function)


def _remember(ctx: click.Context, server: str | None, token: str | None, as_json: bool) -> None:
    """Keep the options given at this level; a level further in (the subcommand) overrides them."""
    ctx.ensure_object(dict)
    ctx.obj["json"] = ctx.obj.get("json", False) or as_json
    for key, value in (("server", server), ("token", token)):
        if value is not None:
            ctx.obj[key] = value


def client_options(group):
    """--server, --token and --json on a group callback (``otad``, ``otad package``): given before
    the subcommand they hold for every client command below, and the subcommand's own win."""
    @functools.wraps(group)
    def run(ctx: click.Context, *args, server, token, as_json, **kwargs):
        _remember(ctx, server, token, as_json)
        return group(*args, **kwargs)

    return click.pass_context(_with_client_options(run))


def client_command(command):
    """The options every client command takes (--config, --server, --token, --json), consumed here:
    the command gets the click context, with ``ctx.obj["json"]`` and the settings to call with."""
    @functools.wraps(command)
    def run(ctx: click.Context, *args, config_file, server, token, as_json, **kwargs):
        _remember(ctx, server, token, as_json)
        server, token = ctx.obj.get("server"), ctx.obj.get("token")
        ctx.obj["settings"] = lambda: _settings(config_file, server, token)
        return command(ctx, *args, **kwargs)

    run = _with_client_options(run)
    run = click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                       envvar="OTAD_CONFIG", help="TOML config file [OTAD_CONFIG]")(run)
    return click.pass_context(run)


def _settings(config_file: Path | None, server: str | None, token: str | None) -> dict[str, str]:
    try:
        settings = load_client_settings(config_file, os.environ, server, token)
    except ConfigError as exc:
        click.echo(f"otad: error: {exc}", err=True)
        sys.exit(2)
    return {"server": settings.server, "token": settings.token}


def register(main: click.Group) -> None:
    """Add the client commands to the ``otad`` group."""

    @main.group()
    @client_options
    def package() -> None:
        """Firmware packages on a running daemon."""

    @package.command("upload")
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @click.option("--name", required=True, help="package name, unique within the product")
    @click.option("--product-id", required=True, type=int)
    @click.option("--version", "firmware_version", help="firmware version to record")
    @click.option("--description")
    @client_command
    def package_upload(ctx, file: Path, name, product_id, firmware_version, description):
        """Upload FILE with a progress bar; prints md5 and sha256 at the end."""
        size = file.stat().st_size

        async def upload():
            with click.progressbar(length=size, label=file.name, file=sys.stderr) as bar:
                async def chunks() -> AsyncIterator[bytes]:
                    with open(file, "rb") as handle:
                        while chunk := handle.read(_CHUNK):
                            bar.update(len(chunk))
                            yield chunk
                form = aiohttp.FormData()
                form.add_field("file", chunks(), filename=file.name, content_type="application/octet-stream")
                params = {"name": name, "productId": str(product_id)}
                if firmware_version:
                    params["version"] = firmware_version
                if description:
                    params["description"] = description
                return await _client(ctx).call("POST", "/api/v2/otaUpload", params=params, data=form)

        data = _run(ctx, upload())
        if ctx.obj["json"]:
            _emit(ctx, data)
        else:
            click.echo(f"uploaded package {data['id']} '{data['name']}' as {data['fileName']} ({data['size']} bytes)")
            click.echo(f"md5    {data['md5']}")
            click.echo(f"sha256 {data['sha256']}")

    @package.command("list")
    @client_command
    def package_list(ctx):
        """List packages."""
        _emit(ctx, _run(ctx, _client(ctx).call("GET", "/api/v2/otaList")), _PACKAGE_COLUMNS)

    @package.command("delete")
    @click.argument("package_id", type=int)
    @client_command
    def package_delete(ctx, package_id):
        """Delete a package and its file."""
        data = _run(ctx, _client(ctx).call("DELETE", "/api/v2/otaDelete", params={"id": str(package_id)}))
        _emit(ctx, data) if ctx.obj["json"] else click.echo(f"deleted package {package_id}")

    @package.command("delta")
    @click.argument("package_id", type=int)
    @click.option("--base", "base_id", type=int, help="the package to patch from; default: the product's "
                  "latest earlier packages")
    @client_command
    def package_delta(ctx, package_id, base_id):
        """Build delta patches to package PACKAGE_ID on the daemon (detools, heatshrink: what
        esp_delta_ota applies; docs/delta.md); waits for them and lists them."""
        params = {"id": str(package_id), **({"base": str(base_id)} if base_id is not None else {})}
        data = _run(ctx, _client(ctx).call("POST", "/api/v2/otaDelta", params=params))
        if ctx.obj["json"]:
            _emit(ctx, data)
            return
        for outcome in data:
            patch = outcome["patch"]
            if patch is None:
                click.echo(f"from package {outcome['baseOtaId']} ({outcome['base'] or 'no version'}): "
                           f"no patch: {outcome['note']}")
            else:
                click.echo(f"from package {outcome['baseOtaId']} ({outcome['base']}): {patch['fileName']}, "
                           f"{patch['size']} bytes, sha256 {patch['sha256']}")

    @main.command("enable")
    @click.argument("name")
    @click.argument("device")
    @click.option("--timeout", type=int, help="seconds the upgrade may take")
    @client_command
    def enable(ctx, name, device, timeout):
        """Push package NAME to DEVICE."""
        params = {"name": name, "deviceName": device, **({"timeout": str(timeout)} if timeout else {})}
        data = _run(ctx, _client(ctx).call("POST", "/api/v2/otaEnable", params=params))
        if ctx.obj["json"]:
            _emit(ctx, data)
        else:
            click.echo(f"upgrade {data[0]['version']}: '{name}' sent to {device}")

    @main.command("upgrades")
    @click.option("--device")
    @click.option("--state")
    @click.option("--campaign", type=int)
    @click.option("--page", type=int, default=1)
    @client_command
    def upgrades(ctx, device, state, campaign, page):
        """Upgrade history, newest first."""
        params = {k: str(v) for k, v in (("deviceName", device), ("state", state), ("campaign", campaign),
                                         ("page", page)) if v is not None}
        data = _run(ctx, _client(ctx).call("GET", "/api/v2/upgrades", params=params))
        if ctx.obj["json"]:
            _emit(ctx, data)
        else:
            _emit(ctx, data["items"], _UPGRADE_COLUMNS)
            click.echo(f"page {data['page']}, {len(data['items'])} of {data['total']}")

    @main.command("devices")
    @client_command
    def devices(ctx):
        """Devices with their state."""
        _emit(ctx, _run(ctx, _client(ctx).call("GET", "/api/v2/devices")), _DEVICE_COLUMNS)

    @main.group()
    @client_options
    def campaign() -> None:
        """Staged rollouts on a running daemon."""

    @campaign.command("create")
    @click.argument("name")
    @click.option("--product-id", required=True, type=int)
    @click.option("--stages", default="1,10,50,100", show_default=True, help="cumulative percentages")
    @click.option("--success-threshold", type=float, default=0.95, show_default=True)
    @click.option("--failure-threshold", type=float, default=0.05, show_default=True)
    @click.option("--max-concurrent", type=int, default=100, show_default=True)
    @click.option("--notify-rate", type=float, default=10, show_default=True, help="commands per second")
    @client_command
    def campaign_create(ctx, name, product_id, stages, success_threshold, failure_threshold, max_concurrent,
                        notify_rate):
        """Roll package NAME out to a product's devices."""
        try:
            stage_list = [int(part) for part in stages.split(",")]
        except ValueError:
            raise click.BadParameter("comma-separated integers, e.g. 1,10,50,100", param_hint="--stages") from None
        body = {"name": name, "productId": product_id, "stages": stage_list, "successThreshold": success_threshold,
                "failureThreshold": failure_threshold, "maxConcurrent": max_concurrent, "notifyRate": notify_rate}
        _emit(ctx, _run(ctx, _client(ctx).call("POST", "/api/v2/campaigns", json=body)))

    @campaign.command("show")
    @click.argument("campaign_id", type=int, required=False)
    @client_command
    def campaign_show(ctx, campaign_id):
        """One campaign's progress, or all campaigns."""
        if campaign_id is None:
            _emit(ctx, _run(ctx, _client(ctx).call("GET", "/api/v2/campaigns")), _CAMPAIGN_COLUMNS)
        else:
            _emit(ctx, _run(ctx, _client(ctx).call("GET", f"/api/v2/campaigns/{campaign_id}")))

    for action in ("pause", "resume", "cancel"):
        def make(action: str):
            @campaign.command(action, help=f"{action.capitalize()} a campaign.")
            @click.argument("campaign_id", type=int)
            @client_command
            def control(ctx, campaign_id):
                data = _run(ctx, _client(ctx).call("POST", f"/api/v2/campaigns/{campaign_id}/{action}"))
                _emit(ctx, data) if ctx.obj["json"] else click.echo(f"campaign {campaign_id}: {data['state']}")
        make(action)


