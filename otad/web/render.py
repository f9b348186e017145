"""Templates (Jinja2, autoescaped) and the helpers pages are rendered with."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import jinja2
from markupsafe import Markup
from aiohttp import web

from otad.web.keys import DASHBOARD, OPERATOR

# Pages are the operator's live view: never served from a cache, never framed by another site,
# and nothing is loaded from anywhere but otad itself.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _percent(part: int, whole: int) -> str:
    return "0" if not whole else f"{100 * part / whole:.0f}"


def templates() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.PackageLoader("otad.web", "templates"),
                                     autoescape=jinja2.select_autoescape(default=True),
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["when"] = _when
    environment.filters["size"] = _size
    environment.globals["percent"] = _percent
    return environment


def render(request: web.Request, template: str, status: int = 200, notices: dict[str, str] | None = None,
           **context: Any) -> web.Response:
    """The page; ``notices``: what ``?done=KEY`` after a form says (fixed texts, so a link
    cannot make the page say anything else)."""
    environment = request.app[DASHBOARD].templates
    operator = request.get(OPERATOR)
    csrf = Markup('<input type="hidden" name="csrf" value="{}">').format(operator.csrf if operator else "")
    body = environment.get_template(template).render(operator=operator, path=request.path, query=request.rel_url.query,
                                                     notices=notices or {}, csrf_field=lambda: csrf, **context)
    return web.Response(text=body, status=status, content_type="text/html", headers=SECURITY_HEADERS)


def see_other(location: str) -> web.Response:
    """After a form: the browser fetches ``location`` (a reload does not repeat the change)."""
    return web.Response(status=303, headers={**SECURITY_HEADERS, "Location": location})
